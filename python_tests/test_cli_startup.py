"""``patchslim --help`` does not import torch, and the package imports lazily.

The parser is built from torch-free modules (cli, settings, errors); the package's
public names are imported on first use (PEP 562). Each case runs in a fresh
interpreter, since this one has torch loaded already.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

import patchslim_ext as ps
from patchslim_ext.benchmark import PAPER_FLOP_REDUCTION
from patchslim_ext.cli import build_parser
from patchslim_ext.data import DIGITS, DIGITS_SPLITS
from patchslim_ext.demo import DemoSettings
from patchslim_ext.export import ONNX_DTYPES
from patchslim_ext.settings import MODEL_NAMES, ONNX_DTYPE_NAMES
from patchslim_ext.vit import MODEL_FACTORIES

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
COMMANDS = ["train", "slim", "finetune", "eval", "flops", "bench", "export", "demo", "info"]


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, check=False
    )


def _imported_modules(importtime_log: str) -> set[str]:
    """The modules a ``python -X importtime`` run imported (its stderr)."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_log.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def _torch_modules(modules: set[str]) -> set[str]:
    return {name for name in modules if name == "torch" or name.startswith("torch.")}


def test_the_parser_builds_without_torch():
    code = (
        "import sys\n"
        "from patchslim_ext.cli import build_parser\n"
        "parser = build_parser()\n"
        "parser.parse_args(['slim', '--model', 'digits_vit', '--random-weights', '--out', 'x'])\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded\n"
    )
    result = _python("-c", code)
    assert result.returncode == 0, result.stderr


def test_importing_the_package_does_not_load_torch():
    code = (
        "import sys, patchslim_ext as ps\n"
        "assert 'torch' not in sys.modules\n"
        "assert 'slim' in ps.__all__ and 'slim' in dir(ps)\n"
    )
    result = _python("-c", code)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_python_m_help_does_not_import_torch(command):
    result = _python("-X", "importtime", "-m", "patchslim_ext", *command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: patchslim")
    modules = _imported_modules(result.stderr)
    assert "patchslim_ext.cli" in modules  # the log is read right
    assert not _torch_modules(modules)
    assert "patchslim_ext.commands" not in modules


def test_the_console_script_is_the_same_torch_free_path():
    """pyproject's ``patchslim`` script calls ``patchslim_ext.cli:main``; run it the way
    the generated script does."""
    pyproject = PYPROJECT.read_text()
    scripts = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", pyproject, re.M | re.S)
    assert scripts is not None and 'patchslim = "patchslim_ext.cli:main"' in scripts.group(1)
    launcher = (
        "import sys\n"
        "from patchslim_ext.cli import main\n"
        "sys.argv[0] = 'patchslim'\n"
        "sys.exit(main())\n"
    )
    result = _python("-X", "importtime", "-c", launcher, "train", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: patchslim train") and "--img-size" in result.stdout
    assert not _torch_modules(_imported_modules(result.stderr))


def test_a_bad_option_is_answered_without_torch():
    result = _python("-X", "importtime", "-m", "patchslim_ext", "eval", "--threads", "0")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "patchslim: error: argument --threads: must be a positive integer, got 0"
    )
    assert not _torch_modules(_imported_modules(result.stderr))


def test_a_command_still_runs_the_work():
    result = _python("-m", "patchslim_ext", "info", "--json")
    assert result.returncode == 0, result.stderr
    assert '"active_cpu_isa"' in result.stdout


def test_the_public_names_resolve():
    for name in ps.__all__:
        assert getattr(ps, name) is not None, name
    assert ps.ops.__name__ == "patchslim_ext.ops"
    assert ps.scoring.impact_scores is not None  # submodules too, as the eager imports gave
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = ps.no_such_name


def test_the_ops_register_with_the_package_once_torch_is_loaded():
    """``import torch; import patchslim_ext`` registers torch.ops.patchslim (as the
    package always did); without torch, the first op-using module does."""
    eager = "import torch, patchslim_ext; torch.ops.patchslim.prefix_layer_norm"
    assert _python("-c", eager).returncode == 0
    lazy = (
        "import patchslim_ext as ps, torch\n"
        "model = ps.digits_vit()\n"  # the model's modules import the ops
        "torch.ops.patchslim.pruned_msa\n"
    )
    result = _python("-c", lazy)
    assert result.returncode == 0, result.stderr


def test_the_parser_choices_are_the_implementations():
    """The parser's torch-free lists name what the torch modules implement."""
    assert tuple(MODEL_FACTORIES) == MODEL_NAMES
    assert tuple(ONNX_DTYPES) == ONNX_DTYPE_NAMES
    assert set(PAPER_FLOP_REDUCTION) <= set(MODEL_NAMES)
    assert (DIGITS, DIGITS_SPLITS) == ("digits", ("train", "test"))
    assert DemoSettings().eps == 0.0022  # the demo's settings, re-exported by demo
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = commands.choices
    assert sorted(commands) == sorted(COMMANDS)
    models = next(a for a in commands["train"]._actions if a.dest == "model")
    assert sorted(models.choices) == sorted(MODEL_FACTORIES)
