"""Fuzzing the numeric options of the patchslim command: whatever the value (ints,
floats, NaN, infinities, negative, huge, not a number at all), ``main`` returns 0 or 2
and never raises (a raise is a traceback). On exit 0 the checkpoint written is finite;
on exit 2 there is one line on stderr and nothing is written."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import patchslim_ext as ps
from patchslim_ext.checkpoint import load_model, save_model
from patchslim_ext.cli import main

TINY = ps.ViTConfig(
    img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=16, depth=2, num_heads=2
)

# Each command with the options fuzzed and base arguments that make one run quick.
COMMANDS = {
    "train": (
        ["--lr", "--shift", "--label-smoothing", "--batch-size", "--weight-decay",
         "--warmup-epochs", "--epochs", "--seed"],
        ["--epochs", "1", "--batch-size", "8"],
    ),
    "finetune": (
        ["--lr", "--temperature", "--distill-weight", "--batch-size", "--shift"],
        ["--epochs", "1", "--batch-size", "8"],
    ),
    "slim": (
        ["--lr", "--eps", "--calib-size", "--batch-size", "--r", "--block-epochs",
         "--flops-ratio"],
        ["--calib-size", "8", "--batch-size", "8", "--r", "8", "--block-epochs", "1"],
    ),
    "eval": (["--batch-size"], []),
}  # fmt: skip
# Options whose large values mean a long run, not an error: kept small when valid.
SMALL = {"--epochs": 2, "--block-epochs": 2, "--warmup-epochs": 10.0}

NUMBERS = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["nan", "-nan", "inf", "-inf", "1e309", "-0", "0", "0.0", "1", "2", "0.5", "1e-300",
         "3.5e38", "1e6", "", " ", "abc", "0x10", "1_000", "١٢", "--", "1e", "99999999999"]
    ),
)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    generator = torch.Generator().manual_seed(0)
    for label in range(2):
        folder = root / "images" / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(8):
            pixels = torch.randint(0, 256, (28, 28), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy(), mode="L").save(folder / f"{index}.png")
    torch.manual_seed(0)
    save_model(ps.VisionTransformer.from_config(TINY), root / "dense.safetensors")
    return {"root": root, "images": root / "images", "dense": root / "dense.safetensors"}


_counter = itertools.count()


def _too_slow(option: str, value: str) -> bool:
    if option not in SMALL:
        return False
    try:
        return float(value) > SMALL[option]
    except ValueError:
        return False


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    command=st.sampled_from(sorted(COMMANDS)),
    choice=st.integers(min_value=0, max_value=100),
    value=NUMBERS,
)
@example(command="train", choice=1, value="-1")  # --shift -1
@example(command="train", choice=2, value="2")  # --label-smoothing 2
@example(command="train", choice=0, value="1e6")  # diverges
@example(command="train", choice=0, value="1e300")  # overflows float32
@example(command="finetune", choice=1, value="1e300")  # temperature**2 overflows
@example(command="slim", choice=0, value="1e6")  # block tuning diverges
@example(command="slim", choice=2, value="100")  # more than the 16 images
@example(command="slim", choice=1, value="nan")
@example(command="eval", choice=0, value=str(10**30))
def test_numeric_options_exit_0_or_2(files, capsys, command, choice, value):
    options, base = COMMANDS[command]
    option = options[choice % len(options)]
    if _too_slow(option, value):
        return
    out = files["root"] / f"out-{next(_counter)}.safetensors"
    argv = [command, "--data", str(files["images"]), *base, f"{option}={value}", "--json"]
    if command == "finetune":
        argv += ["--checkpoint", str(files["dense"]), "--teacher", str(files["dense"])]
    else:
        argv += ["--checkpoint", str(files["dense"])]
    if command != "eval":
        argv += ["--out", str(out)]
    if command == "slim":
        argv += ["--run-dir", str(out.with_suffix(".run"))]
        if option == "--flops-ratio":
            argv += ["--schedule", "uniform"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code in (0, 2), (argv, code, captured.err)
    if code == 2:
        # One error line, last; the lines before it may only be the run's log.
        lines = captured.err.strip().splitlines()
        errors = [line for line in lines if line.startswith("patchslim: error: ")]
        assert errors == lines[-1:], captured.err
        assert all(line.startswith("patchslim: ") for line in lines), captured.err
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    elif command != "eval":
        weights = load_model(out).state_dict().values()
        assert all(bool(torch.isfinite(tensor).all()) for tensor in weights), argv
    if code == 0 and command == "train" and option == "--lr":
        assert float(value) > 0 and math.isfinite(float(value))
