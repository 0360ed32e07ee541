"""Image folders and the global-batch sampler that makes DDP match one process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import patchslim_ext as ps
from patchslim_ext.data import GlobalBatchSampler, ImageFolder, load_dataset


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for index in range(3):
            pixels = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{index}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder(folder):
    data = ImageFolder(folder, img_size=28, in_chans=3)
    assert data.classes == ["cat", "dog"] and len(data) == 6
    image, label = data[4]
    assert image.shape == (3, 28, 28) and image.dtype == torch.float32 and label == 1
    grey, _ = ImageFolder(folder, img_size=28, in_chans=1)[0]
    assert grey.shape == (1, 28, 28)
    assert -3.0 < image.mean().item() < 3.0


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing", 28)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path, 28)
    with pytest.raises(ValueError, match="1×28×28"):
        load_dataset("digits", "train", img_size=224, in_chans=3)


def test_eval_on_an_image_folder(folder, tmp_path):
    config = ps.ViTConfig(28, 7, 3, 2, 32, 2, 2)
    checkpoint = tmp_path / "m.safetensors"
    ps.save_model(ps.VisionTransformer.from_config(config), checkpoint)
    result = subprocess.run(
        [sys.executable, "-m", "patchslim_ext", "eval", "--checkpoint", str(checkpoint),
         "--data", str(folder), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images"] == 6


@pytest.mark.parametrize("equal_shares", [True, False])
def test_ranks_split_each_global_batch(equal_shares):
    single = GlobalBatchSampler(10, 4, shuffle=True, seed=3, equal_shares=equal_shares)
    ranks = [
        GlobalBatchSampler(
            10, 4, shuffle=True, seed=3, equal_shares=equal_shares, rank=r, world_size=2
        )
        for r in range(2)
    ]
    for epoch in range(2):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        merged = [a + b for a, b in zip(*(list(r) for r in ranks), strict=True)]
        assert merged == list(single)
    assert len(single) == 3  # the short last batch is kept
    single.set_epoch(0)
    first = list(single)
    single.set_epoch(1)
    assert list(single) != first


def test_equal_shares_keep_every_image_but_a_remainder_smaller_than_the_world():
    """11 images, global batch 6, 3 processes: the last global batch (5 images) is cut
    to 3, one for each process; one process keeps every image."""
    ranks = [
        GlobalBatchSampler(11, 6, shuffle=True, equal_shares=True, rank=r, world_size=3)
        for r in range(3)
    ]
    shares = [list(r) for r in ranks]
    assert [len(batch) for batch in shares[0]] == [2, 1]  # 6 + 5 -> 6 + 3
    assert ranks[0].used == 9
    drawn = [index for rank in shares for batch in rank for index in batch]
    assert sorted(drawn) == sorted(
        torch.randperm(11, generator=torch.Generator().manual_seed(0))[:9].tolist()
    )
    assert GlobalBatchSampler(13, 4, shuffle=False, equal_shares=True).used == 13


def test_batch_must_split_evenly():
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        GlobalBatchSampler(10, 3, shuffle=False, world_size=2)
