"""The README's "Your own images" walk-through runs as written.

Its bash block is read out of README.md (so the two cannot drift) and run by bash in an
empty directory that holds a generated ``my_images/`` folder, with
``PATCHSLIM_README_SMOKE=1`` (the block reads it, in plain sight, for fewer epochs and
calibration images) and ``patchslim`` defined as ``python -m patchslim_ext``. Then what
each command wrote and printed is checked, down to ONNX Runtime's logits against
PyTorch's. About 40 s on one thread.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import patchslim_ext as ps
from patchslim_ext.data import ImageFolder

README = Path(__file__).parents[1] / "README.md"
HEADING = "## Your own images"
CLASSES = ("checks", "rings", "stripes")
TRAIN_PER_CLASS, VAL_PER_CLASS = 48, 16
STEPS = ["train", "slim", "finetune", "eval", "export"]
# `patchslim` as the console script runs it, with this interpreter (the one under test).
PREAMBLE = 'patchslim() { "$PATCHSLIM_PYTHON" -m patchslim_ext "$@"; }\n'


def walkthrough_block(markdown: str) -> str:
    """The first ```bash block after the walk-through's heading."""
    start = markdown.index(HEADING)
    match = re.compile(r"^```bash\n(.*?)^```$", re.DOTALL | re.MULTILINE).search(markdown, start)
    assert match is not None, f"no ```bash block after {HEADING!r} in {README}"
    return match.group(1)


def _image(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A 40×40 colour image of the class's pattern (stripes, a checkerboard, rings) at
    a random period and phase, in the class's colour on a random dark background, with
    noise: larger than the model's 32 pixels, so the resize and crop run too."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period, phase = rng.uniform(6, 10), rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        wave, colour = np.sin(2 * np.pi * y / period + phase), (0.9, 0.25, 0.2)
    elif kind == "checks":
        wave = np.sin(2 * np.pi * x / period + phase) * np.sin(2 * np.pi * y / period + phase)
        colour = (0.2, 0.8, 0.3)
    else:
        centre_y, centre_x = rng.uniform(0.3 * size, 0.7 * size, 2)
        wave = np.sin(2 * np.pi * np.hypot(y - centre_y, x - centre_x) / period + phase)
        colour = (0.25, 0.35, 0.9)
    mask = (wave > 0).astype(np.float32)[..., None]
    pixels = mask * np.array(colour) + (1 - mask) * rng.uniform(0.0, 0.3, 3)
    pixels += rng.normal(0.0, 0.06, pixels.shape)
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def make_image_folder(root: Path, per_class: int, seed: int) -> None:
    """``root/<class>/<image>``: PNG files, and every third one a JPEG."""
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True)
        for index in range(per_class):
            suffix = ".jpg" if index % 3 == 2 else ".png"
            _image(kind, rng).save(root / kind / f"{index:03d}{suffix}")


def test_the_block_is_the_five_steps():
    """The block is the walk-through the README describes, in order (a block found
    elsewhere, or a step dropped, fails here first)."""
    block = walkthrough_block(README.read_text(encoding="utf-8"))
    steps = re.findall(r"^patchslim (\w+)", block, re.MULTILINE)
    assert steps == STEPS
    assert "PATCHSLIM_README_SMOKE" in block


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """The block run once in a fresh directory: (the directory, bash's stdout)."""
    workdir = tmp_path_factory.mktemp("walkthrough")
    make_image_folder(workdir / "my_images" / "train", TRAIN_PER_CLASS, seed=0)
    make_image_folder(workdir / "my_images" / "val", VAL_PER_CLASS, seed=1)
    script = PREAMBLE + walkthrough_block(README.read_text(encoding="utf-8"))
    result = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=workdir,
        env={**os.environ, "PATCHSLIM_README_SMOKE": "1", "PATCHSLIM_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"the walk-through failed:\n{result.stderr[-4000:]}"
    return workdir, result.stdout


def test_train_makes_a_classifier_of_the_folders(walkthrough):
    workdir, _ = walkthrough
    dense = ps.load_model(workdir / "runs/mine/dense.safetensors")
    config = dense.config
    assert (config.num_classes, config.img_size, config.in_chans) == (len(CLASSES), 32, 3)
    assert dense.plan is None


def test_slim_reaches_the_default_flop_target(walkthrough):
    workdir, stdout = walkthrough
    slimmed = ps.load_model(workdir / "runs/mine/slim.safetensors")
    assert slimmed.plan is not None
    reduction = 1 - ps.flops_of(slimmed.config, slimmed.keep_counts) / ps.flops_of(slimmed.config)
    # The search keeps the run closest to 40% and warns when it is more than 2 points off;
    # r = 10 of 65 tokens is coarse, so a little more slack than that.
    assert 0.30 < reduction < 0.55, stdout
    assert (workdir / "runs/mine/slim.safetensors.run/state.json").is_file()


def test_eval_prints_the_top1_of_the_tuned_model(walkthrough):
    workdir, stdout = walkthrough
    tuned = workdir / "runs/mine/tuned.safetensors"
    assert ps.load_model(tuned).plan == ps.load_model(workdir / "runs/mine/slim.safetensors").plan
    pattern = r"^runs/mine/tuned\.safetensors: top-1 ([\d.]+)% on (\d+) images"
    match = re.search(pattern, stdout, re.MULTILINE)
    assert match is not None, stdout
    top1, images = float(match.group(1)), int(match.group(2))
    assert images == len(CLASSES) * VAL_PER_CLASS
    assert top1 > 100 / len(CLASSES) + 20  # well above chance: the patterns were learned


def test_the_onnx_file_runs_in_onnx_runtime_as_in_pytorch(walkthrough):
    onnxruntime = pytest.importorskip("onnxruntime")
    workdir, _ = walkthrough
    model = ps.load_model(workdir / "runs/mine/tuned.safetensors").eval()
    held_out = ImageFolder(workdir / "my_images/val", img_size=32, in_chans=3)
    images = torch.stack([held_out[index][0] for index in range(0, len(held_out), 7)])
    with torch.no_grad():
        expected = model(images).numpy()
    session = onnxruntime.InferenceSession(
        str(workdir / "runs/mine/tuned.onnx"), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(["logits"], {"images": images.numpy()})  # a dynamic batch of 7
    assert logits.shape == (len(images), len(CLASSES))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
