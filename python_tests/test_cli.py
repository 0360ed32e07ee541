"""The patchslim command: help, JSON output, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patchslim_ext as ps
from patchslim_ext.checkpoint import save_model
from patchslim_ext.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "patchslim_ext", *args], capture_output=True, text=True, timeout=300
    )


RANDOM = ["--model", "digits_vit", "--random-weights"]
COMMANDS = ["train", "slim", "finetune", "eval", "flops", "bench", "export", "demo", "info"]


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: patchslim" in capsys.readouterr().out


def test_flops_json_matches_analytic(capsys):
    assert main(["flops", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "digits_vit"
    assert report["fvcore_total"] == report["analytic_total"] == ps.flops_of(ps.digits_vit().config)
    assert len(report["blocks"]) == 12
    assert not report["unsupported_ops"]


def test_flops_of_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    save_model(ps.digits_vit(), path)
    assert main(["flops", "--checkpoint", str(path)]) == 0
    assert "total: fvcore 0.07" in capsys.readouterr().out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["active_cpu_isa"] in ("scalar", "avx2", "avx512", "avx512_bf16")
    assert info["native_bf16"] == torch.cpu._is_avx512_bf16_supported()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["frobnicate"], "invalid choice"),
        (["flops", "--model", "resnet50"], "invalid choice"),
        (["flops", "--checkpoint", "/does/not/exist.pth"], "checkpoint not found"),
        (["slim", "--checkpoint", "/does/not/exist.pth", "--out", "x"], "checkpoint not found"),
        (["slim", *RANDOM, "--out", "x", "--data", "/no/such/folder"], "does not exist"),
        (["slim", *RANDOM, "--out", "x", "--data", __file__], "is a file; give an image folder"),
        (["slim", "--out", "x"], "--checkpoint FILE (a trained model), or --model NAME"),
        (["slim", "--model", "digits_vit", "--out", "x"], "--random-weights"),
        (["slim", *RANDOM, "--out", "x", "--schedule", "uniform", "--eps", "0.1"], "uniform"),
        (["slim", *RANDOM, "--out", "x", "--eps", "5"], "--eps: must be in [0, 1), got 5.0"),
        (["slim", *RANDOM, "--out", "x", "--keep-counts", "9,a"], "comma-separated integers"),
        (["slim", *RANDOM, "--out", "x", "--score", "entropy"], "invalid choice"),
        (["eval", "--checkpoint", str(Path(__file__).parent)], "is a directory; give a checkpoint"),
        (["train", "--out", "x", "--epochs", "-1"], "--epochs: must be >= 0"),
        (["finetune", "--checkpoint", "a", "--out", "b"], "--teacher"),
        (["eval", "--checkpoint", "/does/not/exist.safetensors"], "checkpoint not found"),
        pytest.param(
            ["bench", "--device", "cuda"],
            "CUDA is not available",
            # With a GPU the command is valid (it would run the whole benchmark).
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    result = _run(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("patchslim: error:") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_corrupt_checkpoint_exit_2(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not safetensors")
    result = _run("flops", "--checkpoint", str(path))
    assert result.returncode == 2
    assert "cannot read checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_teacher_exit_2(tmp_path):
    slimmed = tmp_path / "slim.safetensors"
    save_model(ps.digits_vit(), slimmed)
    teacher = tmp_path / "teacher.pth"
    teacher.write_bytes(b"\x80\x04 garbage")
    result = _run("finetune", "--checkpoint", str(slimmed), "--teacher", str(teacher), "--out", "o")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("patchslim: error: --teacher:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_slim_finetune_eval_pipeline(tmp_path):
    """The commands chained on a tiny model and a slice of the digits' calibration set."""
    config = ps.ViTConfig(28, 7, 1, 10, 32, 3, 2)
    dense = tmp_path / "dense.safetensors"
    save_model(ps.VisionTransformer.from_config(config), dense)
    slimmed = tmp_path / "slim.safetensors"
    result = _run(
        "slim", "--checkpoint", str(dense), "--out", str(slimmed), "--calib-size", "48",
        "--r", "4", "--block-epochs", "1", "--batch-size", "16", "--eps", "0.05", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["keep_counts"][-1] == 1 and summary["slim_flops"] < summary["dense_flops"]
    assert (tmp_path / "slim.safetensors.run" / "state.json").is_file()
    assert ps.load_model(slimmed).plan is not None

    tuned = tmp_path / "tuned.safetensors"
    result = _run(
        "finetune", "--checkpoint", str(slimmed), "--teacher", str(dense), "--out", str(tuned),
        "--epochs", "1", "--batch-size", "500", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["held_out"]["images"] == 1000

    result = _run("eval", "--checkpoint", str(tuned), "--json")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads(result.stdout)
    assert evaluation["keep_counts"] == summary["keep_counts"]
    assert evaluation["flops"] == summary["slim_flops"] and evaluation["images"] == 1000

    result = _run("flops", "--checkpoint", str(tuned), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fvcore_total"] == report["analytic_total"] == summary["slim_flops"]


DEMO = str(Path(ps.__file__).parent / "assets" / "digits_vit.safetensors")
QUICK_SLIM = ["--calib-size", "64", "--r", "6", "--block-epochs", "0", "--batch-size", "64"]


def test_slim_searches_eps_for_the_default_flop_target(tmp_path):
    out = tmp_path / "slim.safetensors"
    result = _run("slim", "--checkpoint", DEMO, "--out", str(out), *QUICK_SLIM)
    assert result.returncode == 0, result.stderr
    assert "for a 40% FLOP target" in result.stdout
    result = _run("slim", "--checkpoint", DEMO, "--out", str(out), *QUICK_SLIM, "--json")
    summary = json.loads(result.stdout)
    assert summary["settings"]["flops_reduction"] is None  # the default target, 40%
    assert summary["eps_search"] and len(summary["block_eps"]) == 11
    chosen = [e for e in summary["eps_search"] if e["block_eps"] == summary["block_eps"]]
    assert chosen and chosen[0]["flops_reduction"] == pytest.approx(summary["flop_reduction"])
    if abs(summary["flop_reduction"] - 0.4) > 0.02:
        assert any("FLOP target" in warning for warning in summary["warnings"])
    assert [b["eps"] for b in sorted(summary["blocks"], key=lambda b: b["block"])] == (
        summary["block_eps"]
    )


def test_slim_reports_a_collapsed_model(tmp_path):
    out = tmp_path / "slim.safetensors"
    result = _run(
        "slim", "--checkpoint", DEMO, "--out", str(out), *QUICK_SLIM, "--schedule", "uniform",
        "--flops-reduction", "0.9", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["calibration_agreement"] < 0.8 and summary["eps"] is None
    assert any("collapsed" in warning for warning in summary["warnings"])
    assert "collapsed" in result.stderr  # logged as a warning too
