"""The models users hold, end to end: slim → finetune → eval → save → load (still slimmed)
→ bench, from the command line and from Python. timm DeiT-S (plain and distilled),
DeiT-III and T2T-ViT-14, at 32 px with random weights on a generated image folder."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import patchslim_ext as ps
from patchslim_ext.benchmark import compare
from patchslim_ext.cli import main
from patchslim_ext.data import ImageFolder

timm = pytest.importorskip("timm", reason="timm is not installed (the [test] extra has it)")

IMG_SIZE, CLASSES = 32, 3
TIMM_MODELS = [
    "deit_small_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit3_small_patch16_224",
]


def _image_folder(root, per_class: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for label in range(CLASSES):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = torch.randint(0, 256, (IMG_SIZE, IMG_SIZE, 3), generator=generator)
            pixels[..., label] = 255  # something to learn
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{index}.png")
    return root


def _state_dict_file(name: str, path):
    """A model as users have it: a timm (or official T2T-ViT) state dict, no metadata."""
    torch.manual_seed(0)
    if name == "t2t_vit_14":
        model = ps.t2t_vit_14(img_size=IMG_SIZE, num_classes=CLASSES)
    else:
        model = timm.create_model(name, img_size=IMG_SIZE, num_classes=CLASSES)
    torch.save({"model": model.state_dict()}, path)
    return model


def _cli(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", [*TIMM_MODELS, "t2t_vit_14"])
def test_command_line_pipeline(name, tmp_path, capsys):
    train = _image_folder(tmp_path / "train", per_class=4, seed=0)
    held_out = _image_folder(tmp_path / "held_out", per_class=2, seed=1)
    dense = tmp_path / "dense.pth"
    _state_dict_file(name, dense)
    slimmed, tuned = tmp_path / "slim.safetensors", tmp_path / "tuned.safetensors"
    heads = ["--num-heads", "6"]
    summary = _cli(
        capsys, "slim", "--checkpoint", str(dense), *heads, "--data", str(train),
        "--out", str(slimmed), "--schedule", "uniform", "--flops-reduction", "0.2",
        "--calib-size", "8", "--block-epochs", "1", "--batch-size", "4",
    )  # fmt: skip
    assert summary["slim_flops"] < summary["dense_flops"]
    _cli(
        capsys, "finetune", "--checkpoint", str(slimmed), "--teacher", str(dense), *heads,
        "--data", str(train), "--eval-data", str(held_out), "--out", str(tuned),
        "--epochs", "1", "--batch-size", "4",
    )  # fmt: skip
    evaluation = _cli(capsys, "eval", "--checkpoint", str(tuned), "--data", str(held_out))
    assert evaluation["images"] == 2 * CLASSES
    assert evaluation["keep_counts"] == summary["keep_counts"]
    loaded = ps.load_model(tuned)
    assert list(loaded.plan.keep_counts) == summary["keep_counts"]
    report = _cli(capsys, "bench", "--checkpoint", str(tuned), "--batch", "2", "--repeats", "2")
    (row,) = report["rows"]
    assert row["slim_flops"] == summary["slim_flops"] and row["keep_counts"] == row["keep_counts"]
    if name != "t2t_vit_14":
        fresh = timm.create_model(name, img_size=IMG_SIZE, num_classes=CLASSES)
        fresh.load_state_dict(loaded.state_dict(), strict=True)


@pytest.mark.parametrize("name", ["deit_small_distilled_patch16_224", "t2t_vit_14"])
def test_python_pipeline(name, tmp_path):
    train = ImageFolder(_image_folder(tmp_path / "train", 4, seed=2), IMG_SIZE, 3)
    model = _state_dict_file(name, tmp_path / "dense.pth").eval()
    result = ps.slim(
        model,
        train,
        schedule="uniform",
        flops_reduction=0.2,
        calib_size=8,
        block_epochs=1,
        batch_size=4,
        progress=False,
    )
    slimmed = result.model
    assert type(slimmed) is not type(model) or slimmed is not model
    ps.finetune(slimmed, model, train, epochs=1, batch_size=4, progress=False)
    accuracy = ps.evaluate(slimmed, train)
    assert accuracy["images"] == 4 * CLASSES
    path = tmp_path / "slim.safetensors"
    ps.save_model(slimmed, path)
    loaded = ps.load_model(path).eval()  # T2T's token layers have dropout
    assert loaded.plan == result.plan
    images = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), slimmed.eval()(images), rtol=1e-4, atol=1e-5)
    row = compare(name, loaded.set_plan(None), result.plan, batch=2, repeats=2)
    assert row.slim_flops < row.dense_flops
