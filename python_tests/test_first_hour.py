"""The first hour of a new user: what ``--help`` promises, the held-out folder of
``eval``, class folders that do not match the model, colour images for a greyscale model,
the defaults of ``train`` on an image folder, a ``slim`` that resumes after Ctrl-C, and
an epoch that trains on every image.

The commands run in this process (``main``), on tiny models (3-4 blocks of width 16-32,
17 tokens) and folders of a few 28×28 images, one epoch: a few seconds in all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import pytest
import torch
from PIL import Image

import patchslim_ext as ps
from patchslim_ext import commands
from patchslim_ext.checkpoint import load_model, save_model
from patchslim_ext.cli import main
from patchslim_ext.data import ImageFolder
from patchslim_ext.settings import (
    DEFAULT_FLOPS_REDUCTION,
    DemoSettings,
    FinetuneSettings,
    SlimSettings,
    TrainSettings,
)

TINY = ps.ViTConfig(
    img_size=28, patch_size=7, in_chans=1, num_classes=2, embed_dim=32, depth=3, num_heads=2
)
# `train --model digits_vit` made tiny: 16 tokens of 7×7 pixels, one block of width 16.
TINY_TRAIN = ["--model", "digits_vit", "--patch-size", "7", "--embed-dim", "16", "--depth", "1",
              "--num-heads", "2", "--epochs", "1", "--batch-size", "4", "--json"]  # fmt: skip
SLIM_ARGS = ["--calib-size", "16", "--batch-size", "8", "--r", "4", "--block-epochs", "1"]


# --- helpers -----------------------------------------------------------------------------


def _image_folder(root, classes: int = 2, per_class: int = 3, *, colour: bool = False):
    """``root/class<k>/<i>.png``: random 28×28 images, greyscale (mode L) or RGB."""
    generator = torch.Generator().manual_seed(classes * 100 + per_class)
    shape = (28, 28, 3) if colour else (28, 28)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy(), mode="RGB" if colour else "L").save(
                folder / f"{index}.png"
            )
    return root


def _checkpoint(path, seed: int = 0, **changes):
    torch.manual_seed(seed)
    save_model(ps.VisionTransformer.from_config(dataclasses.replace(TINY, **changes)), path)
    return path


def _ok(capsys, argv: list[str]) -> tuple[dict, str]:
    """``main(argv + --json)`` succeeds: its JSON summary and its stderr (the log)."""
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), captured.err


def _refused(capsys, argv: list[str], *words: str) -> str:
    """``main(argv)`` exits 2 with one error line, the last on stderr (log lines
    ``patchslim: ...`` may precede it), that contains ``words``; no traceback."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, f"exit {code}; stderr:\n{captured.err}"
    lines = captured.err.strip().splitlines()
    assert lines and all(line.startswith("patchslim: ") for line in lines), captured.err
    errors = [line for line in lines if line.startswith("patchslim: error: ")]
    assert errors == lines[-1:], captured.err
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    return errors[0]


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("patchslim: warning: ")]


# --- 1. --help shows the defaults ---------------------------------------------------------


def _help(capsys, monkeypatch, command: str) -> str:
    """``patchslim <command> --help`` after the usage line (the description and the
    options), its whitespace collapsed (wide, so no wrapping)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    usage, rest = capsys.readouterr().out.split("\n\n", 1)
    assert usage.startswith(f"usage: patchslim {command} ")
    return " ".join(rest.split())


def _shows_default(text: str, option: str, default) -> None:
    """``option``'s own help (up to the next option) ends with ``(default: <default>)``."""
    pattern = rf"{re.escape(option)} \S+ (?:(?! --).)*?\(default: {re.escape(str(default))}\)"
    assert re.search(pattern, text), f"{option}: no '(default: {default})' in\n{text}"


@pytest.mark.parametrize(
    ("command", "settings", "options"),
    [
        ("train", TrainSettings(), {"--epochs": "epochs", "--lr": "lr",
                                    "--batch-size": "batch_size"}),
        ("finetune", FinetuneSettings(), {"--epochs": "epochs", "--lr": "lr",
                                          "--distillation": "distillation"}),
        ("slim", SlimSettings(), {"--score": "score", "--schedule": "schedule", "--r": "r",
                                  "--calib-size": "calib_size", "--lr": "lr"}),
        ("demo", DemoSettings(), {"--eps": "eps", "--r": "r", "--block-epochs": "block_epochs",
                                  "--calib-size": "calib_size",
                                  "--finetune-epochs": "finetune_epochs"}),
    ],
)  # fmt: skip
def test_help_shows_the_settings_defaults(capsys, monkeypatch, command, settings, options):
    text = _help(capsys, monkeypatch, command)
    for option, field in options.items():
        _shows_default(text, option, getattr(settings, field))


def test_slim_help_describes_the_default_flop_target(capsys, monkeypatch):
    text = _help(capsys, monkeypatch, "slim")
    target = SlimSettings().target_reduction
    assert target == DEFAULT_FLOPS_REDUCTION
    assert f"so that {100 * target:.0f}% of the FLOPs go" in text  # the description
    option = re.search(r"--flops-reduction \S+ (?:(?! --).)*", text)
    assert option is not None
    assert f"(default: {DEFAULT_FLOPS_REDUCTION:g} when neither eps nor keep counts" in (
        option.group(0)
    )


# --- 2. eval's held-out folder ------------------------------------------------------------


@pytest.mark.parametrize("option", ["--eval-data", "--data"])
def test_eval_reads_the_held_out_folder(tmp_path, capsys, option):
    dense = _checkpoint(tmp_path / "dense.safetensors")
    held_out = _image_folder(tmp_path / "held_out", classes=2, per_class=3)
    summary, _ = _ok(capsys, ["eval", "--checkpoint", str(dense), option, str(held_out)])
    assert summary["images"] == 6
    model = load_model(dense)
    expected = ps.evaluate(model, ImageFolder(held_out, 28, 1))
    assert summary["top1"] == pytest.approx(expected["top1"])
    assert summary["loss"] == pytest.approx(expected["loss"])


# --- 3. class folders against the model's head -------------------------------------------


@pytest.fixture
def models(tmp_path):
    """A tiny dense 2-class checkpoint and a slimmed copy of it."""
    dense = _checkpoint(tmp_path / "dense.safetensors")
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    result = ps.slim(load_model(dense), images, schedule="fixed", keep_counts=[17, 12, 1],
                     block_epochs=0, progress=False)  # fmt: skip
    slimmed = tmp_path / "slim.safetensors"
    save_model(result.model, slimmed)
    return {"dense": dense, "slim": slimmed, "root": tmp_path}


@pytest.mark.parametrize("classes", [1, 3])
def test_finetune_and_eval_refuse_other_class_folders(models, capsys, classes):
    images = _image_folder(models["root"] / "images", classes=classes)
    words = (f"{classes} class folders", "head has 2 classes")
    out = models["root"] / "tuned.safetensors"
    _refused(
        capsys,
        ["finetune", "--checkpoint", str(models["slim"]), "--teacher", str(models["dense"]),
         "--data", str(images), "--out", str(out), "--epochs", "1"],
        "--data", *words,
    )  # fmt: skip
    good = _image_folder(models["root"] / "good", classes=2)
    _refused(
        capsys,
        ["finetune", "--checkpoint", str(models["slim"]), "--teacher", str(models["dense"]),
         "--data", str(good), "--eval-data", str(images), "--out", str(out), "--epochs", "1"],
        "--eval-data", *words,
    )  # fmt: skip
    _refused(capsys, ["eval", "--checkpoint", str(models["slim"]), "--data", str(images)], *words)
    assert not out.exists()


def test_train_refuses_other_class_folders(models, capsys):
    """--num-classes other than the folder's, or a checkpoint's head: refused."""
    images = _image_folder(models["root"] / "images", classes=2)
    out = models["root"] / "trained.safetensors"
    _refused(
        capsys,
        ["train", *TINY_TRAIN, "--num-classes", "3", "--data", str(images), "--out", str(out)],
        "2 class folders", "head has 3 classes",
    )  # fmt: skip
    three = _image_folder(models["root"] / "three", classes=3)
    _refused(
        capsys,
        ["train", "--checkpoint", str(models["dense"]), "--data", str(three), "--out", str(out),
         "--epochs", "1"],
        "3 class folders", "head has 2 classes",
    )  # fmt: skip
    assert not out.exists()


def test_train_refuses_a_head_other_than_the_digits(models, capsys):
    """The built-in digits (the default --data) have 10 classes: a head with another
    number, asked for or a checkpoint's, is refused before training (it was a traceback:
    cross-entropy's target out of bounds)."""
    out = models["root"] / "trained.safetensors"
    _refused(
        capsys, ["train", *TINY_TRAIN, "--num-classes", "3", "--out", str(out)],
        "--data digits: 10 classes", "head has 3 classes",
    )  # fmt: skip
    _refused(
        capsys,
        ["train", "--checkpoint", str(models["dense"]), "--epochs", "1", "--out", str(out)],
        "--data digits: 10 classes", "head has 2 classes",
    )  # fmt: skip
    assert not out.exists()


def test_eval_refuses_the_digits_for_another_head(models, capsys):
    _refused(
        capsys, ["eval", "--checkpoint", str(models["dense"])],
        "--eval-data digits: 10 classes", "head has 2 classes",
    )  # fmt: skip


def test_slim_warns_about_fewer_class_folders_and_refuses_more(models, capsys):
    """slim does not use the labels: a folder with fewer classes than the head (a subset)
    is calibrated on with a warning; one with more cannot be this model's data."""
    out = models["root"] / "slimmed.safetensors"
    argv = ["slim", "--checkpoint", str(models["dense"]), "--out", str(out), *SLIM_ARGS,
            "--schedule", "uniform", "--flops-reduction", "0.2"]  # fmt: skip
    one = _image_folder(models["root"] / "one", classes=1, per_class=8)
    summary, stderr = _ok(capsys, [*argv, "--data", str(one)])
    assert any(
        "1 class folders (class0), but the model's head has 2 classes" in line
        for line in _warnings(stderr)
    ), stderr
    assert out.is_file() and load_model(out).plan is not None
    assert summary["slim_flops"] < summary["dense_flops"]
    out.unlink()
    three = _image_folder(models["root"] / "three", classes=3)
    _refused(capsys, [*argv, "--data", str(three)], "3 class folders", "head has 2 classes")
    assert not out.exists()


# --- 4. a one-class folder ----------------------------------------------------------------


def test_train_refuses_a_single_class_folder(tmp_path, capsys):
    images = _image_folder(tmp_path / "images", classes=1, per_class=4)
    out = tmp_path / "trained.safetensors"
    _refused(
        capsys, ["train", *TINY_TRAIN, "--data", str(images), "--out", str(out)],
        f"--data {images}: 1 class folder(s); a classifier needs at least 2",
    )  # fmt: skip
    _refused(
        capsys, ["train", *TINY_TRAIN, "--num-classes", "1", "--out", str(out)],
        "--num-classes 1", "a classifier needs at least 2",
    )  # fmt: skip
    assert not out.exists()


# --- 5. colour images, greyscale model ----------------------------------------------------

COLOUR_WARNING = "the images are in colour but the model reads 1 channel"


def test_train_warns_about_colour_images_for_one_channel(tmp_path, capsys):
    colour = _image_folder(tmp_path / "colour", colour=True)
    grey = _image_folder(tmp_path / "grey")
    out = tmp_path / "trained.safetensors"
    _, stderr = _ok(capsys, ["train", *TINY_TRAIN, "--data", str(colour), "--out", str(out)])
    assert any(COLOUR_WARNING in line for line in _warnings(stderr)), stderr
    assert "--in-chans 3" in stderr
    assert load_model(out).config.in_chans == 1
    for data, chans in ((colour, "3"), (grey, "1")):  # what the model reads: no warning
        _, stderr = _ok(
            capsys,
            ["train", *TINY_TRAIN, "--data", str(data), "--in-chans", chans, "--out", str(out)],
        )
        assert COLOUR_WARNING not in stderr


# --- 6. train's defaults on an image folder -----------------------------------------------


def test_train_takes_the_classes_from_the_folder(tmp_path, capsys):
    images = _image_folder(tmp_path / "images", classes=3, colour=True)
    out = tmp_path / "trained.safetensors"
    _, stderr = _ok(
        capsys,
        ["train", *TINY_TRAIN, "--data", str(images), "--img-size", "14", "--in-chans", "3",
         "--out", str(out)],
    )  # fmt: skip
    assert "3×14×14 images" in stderr and "3 classes" in stderr
    config = load_model(out).config
    assert (config.num_classes, config.img_size, config.in_chans) == (3, 14, 3)
    assert (config.patch_size, config.embed_dim, config.depth) == (7, 16, 1)


# --- 7. a resumed slim says so --------------------------------------------------------------


def test_interrupted_slim_resumes_and_says_so(tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first block (the deepest tuned one) of the CLI's default slim (eps
    searched for the 40% FLOP target), then the same command again: it resumes from
    ``<out>.run`` and ends with the keep counts of an uninterrupted run."""
    dense = _checkpoint(tmp_path / "dense.safetensors", depth=4)
    images = _image_folder(tmp_path / "images", classes=2, per_class=8)

    def argv(out):
        return ["slim", "--checkpoint", str(dense), "--data", str(images), "--out", str(out),
                *SLIM_ARGS]  # fmt: skip

    reference, _ = _ok(capsys, argv(tmp_path / "reference.safetensors"))
    assert reference["eps_search"]  # the default: eps searched for a FLOP target

    blocks_done = []

    def interrupt(log):
        blocks_done.append(log.block)
        raise KeyboardInterrupt

    out = tmp_path / "slim.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(commands, "slim", functools.partial(commands.slim, on_block_end=interrupt))
        assert main([*argv(out), "--json"]) == 130
    assert blocks_done == [3]  # block 4, the last, keeps its head tokens; 3 is tuned first
    assert "interrupted (slim resumes from its --run-dir)" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "slim.safetensors.run" / "state.json").is_file()

    resumed, stderr = _ok(capsys, argv(out))
    run_dir = tmp_path / "slim.safetensors.run"
    assert f"patchslim: resuming from {run_dir}: blocks 3-4 are done" in stderr.splitlines()
    assert resumed["run_dir"] == str(run_dir)
    assert resumed["keep_counts"] == reference["keep_counts"]
    assert resumed["slim_flops"] == reference["slim_flops"]
    assert list(load_model(out).plan.keep_counts) == reference["keep_counts"]


# --- 8. the last short batch is trained on ------------------------------------------------


def test_an_epoch_trains_on_every_image(tmp_path, capsys):
    """10 images in batches of 4: the short last batch (2 images) is kept."""
    images = _image_folder(tmp_path / "images", classes=2, per_class=5)
    out = tmp_path / "trained.safetensors"
    summary, _ = _ok(
        capsys,
        ["train", *TINY_TRAIN, "--data", str(images), "--epochs", "2", "--out", str(out)],
    )
    assert [epoch["images"] for epoch in summary["epochs"]] == [10, 10]
    model = ps.digits_vit(patch_size=7, embed_dim=16, depth=1, num_heads=2, num_classes=2)
    logs = ps.train(model, ImageFolder(images, 28, 1), epochs=1, batch_size=3, progress=False)
    assert logs[0].images == 10
