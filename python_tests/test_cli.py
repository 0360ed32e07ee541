"""The patchslim command: help, JSON output, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import patchslim_ext as ps
from patchslim_ext.checkpoint import save_model
from patchslim_ext.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "patchslim_ext", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("command", [[], ["flops"], ["info"]])
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
    assert info["active_cpu_isa"] in ("scalar", "avx2", "avx512")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["frobnicate"], "invalid choice"),
        (["flops", "--model", "resnet50"], "invalid choice"),
        (["flops", "--checkpoint", "/does/not/exist.pth"], "checkpoint not found"),
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
