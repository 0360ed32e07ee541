"""The demo's pieces that run in seconds: the bundled checkpoint, the digits split,
the figures, and a run cut short to check what it writes and prints (the whole demo
runs in scripts/demo.sh)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import patchslim_ext as ps
from patchslim_ext import demo
from patchslim_ext.data import DIGITS_SPLITS, digits_split_indices, load_digits
from patchslim_ext.demo import (
    DEMO_CHECKPOINT,
    DemoSettings,
    format_demo,
    plot_keep_counts,
    plot_kept_patches,
    run_demo,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bundled_checkpoint_is_the_demo_architecture():
    model = ps.load_model(DEMO_CHECKPOINT)
    assert isinstance(model, ps.VisionTransformer)
    assert model.config == ps.digits_vit().config
    assert model.config.num_tokens >= 50 and model.config.depth == 12
    assert DEMO_CHECKPOINT.stat().st_size <= 8 * 2**20


def test_digits_split_is_fixed_and_disjoint():
    train, test = digits_split_indices()
    assert len(train) == 4000 and len(test) == 1000
    assert not set(train.tolist()) & set(test.tolist())
    again = digits_split_indices()
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    images, labels = load_digits("test").tensors
    assert images.shape == (1000, 1, 28, 28) and labels.shape == (1000,)
    assert set(labels.tolist()) == set(range(10))
    assert abs(images.mean().item()) < 0.1 and 0.8 < images.std().item() < 1.2


def test_bundled_model_classifies_digits():
    model = ps.load_model(DEMO_CHECKPOINT)
    images, labels = load_digits("test").tensors
    with torch.no_grad():
        accuracy = (model(images[:200]).argmax(-1) == labels[:200]).float().mean().item()
    assert accuracy > 0.9


def test_figures(tmp_path):
    config = ps.digits_vit().config
    order = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(49) + 1])
    plan = ps.SlimPlan(order, [50, 45, 40, 35, 30, 25, 20, 15, 10, 5, 2, 1])
    images, labels = load_digits("test").tensors
    plot_keep_counts(plan, tmp_path / "pyramid.png")
    plot_kept_patches(images[:3], labels[:3], plan, config, tmp_path / "digits.png")
    for name in ("pyramid.png", "digits.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_a_short_run_reports_everything_it_wrote(tmp_path, monkeypatch):
    # A fifth of the digits (the splits are in label order), no tuning, a loose
    # tolerance: seconds instead of minutes.
    few = {
        split: TensorDataset(*(tensor[::5] for tensor in load_digits(split).tensors))
        for split in DIGITS_SPLITS
    }
    monkeypatch.setattr(demo, "load_digits", few.__getitem__)
    monkeypatch.setattr(demo, "THROUGHPUT_BATCH", 8)
    monkeypatch.setattr(demo, "THROUGHPUT_REPEATS", 1)
    settings = DemoSettings(eps=0.5, block_epochs=0, calib_size=32, finetune_epochs=0)
    previous = os.umask(0o022)
    try:
        summary = run_demo(tmp_path, settings, progress=False)
    finally:
        os.umask(previous)
    lines = format_demo(summary)
    wrote = [line.removeprefix("wrote ") for line in lines if line.startswith("wrote ")]
    assert wrote == summary["outputs"]
    assert [Path(path).name for path in wrote] == [
        "kept_patches_per_block.png",
        "kept_patches_digits.png",
        "digits_vit_slim.safetensors",
        "summary.json",
        "slim.run",
    ]
    *files, run_dir = map(Path, wrote)
    assert wrote[-1].endswith(os.sep) and (run_dir / "state.json").is_file()
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    counts = f"tokens kept per block (class token included): {summary['keep_counts']}"
    assert counts in lines


def test_the_documented_summary_formats_as_the_demo_prints_it():
    """docs/demo/summary.json is a demo run's summary (1 or more threads): it
    formats into the demo's lines, the keep counts the plan the figures show."""
    summary = json.loads((Path(__file__).parents[1] / "docs/demo/summary.json").read_text())
    lines = format_demo(summary)
    assert f"tokens kept per block (class token included): {summary['keep_counts']}" in lines
    (timing,) = [line for line in lines if line.startswith("slimming ")]
    threads = summary["threads"]
    assert timing.endswith(f"on {threads} thread" + ("" if threads == 1 else "s"))
