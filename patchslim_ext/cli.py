"""The ``patchslim`` command (also ``python -m patchslim_ext``): its parser and entry point.

Every subcommand has ``--help`` and ``--json`` (a machine-readable summary on
stdout, strict JSON: NaN becomes null). Expected errors
(:class:`~patchslim_ext.errors.PatchslimError`: bad arguments, unreadable files, a run
that diverges) end with a one-line message on stderr and exit code 2; anything else is
a bug and keeps its traceback.

This module imports no torch: the parser is built from the torch-free
:mod:`patchslim_ext.settings`, so that ``--help`` and a bad option are answered at once,
without loading torch. The work is in :mod:`patchslim_ext.commands`, imported once the
arguments are parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from patchslim_ext.errors import PatchslimError, UsageError
from patchslim_ext.settings import (
    DIGITS,
    DIGITS_SPLITS,
    MAX_FLOAT32,
    MODEL_NAMES,
    ONNX_DTYPE_NAMES,
    PAPER_FLOP_REDUCTION,
    DemoSettings,
    FinetuneSettings,
    SlimSettings,
    TrainSettings,
    check_value,
    value_type,
)

DEFAULT_MODEL = "digits_vit"
# Options whose names predate the settings dataclasses' field names.
_OPTION_NAMES = {"max_shift": "--shift", "num_workers": "--workers"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, unless there is none (None, a flag) or the
    help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse's own usage errors
        raise UsageError(message)

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # Python 3.11's argparse drops a "--" given as a value ("--seed=--") and returns
        # an empty list for an option that takes one value.
        if action.nargs is None and action.option_strings and arg_strings in ([], ["--"]):
            raise UsageError(f"argument {'/'.join(action.option_strings)}: expected one value")
        return super()._get_values(action, arg_strings)


def build_parser() -> argparse.ArgumentParser:
    """The ``patchslim`` parser, one subparser per command (``args.command`` names the
    one given). Builds without importing torch."""
    parser = _Parser(
        prog="patchslim",
        description="Patch Slimming for Efficient Vision Transformers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    flops = commands.add_parser(
        "flops",
        help="FLOP report of a model (fvcore and analytic, per block)",
        description="Count FLOPs per block with fvcore and with the analytic formula.",
    )
    source = flops.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        choices=sorted(MODEL_NAMES),
        default=DEFAULT_MODEL,
        help=f"architecture with random weights (default: {DEFAULT_MODEL}, the demo model)",
    )
    source.add_argument(
        "--checkpoint", type=Path, help="a .safetensors or .pth checkpoint instead of --model"
    )
    _add_num_heads(flops)
    flops.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    train_cmd = commands.add_parser(
        "train",
        help="train a ViT from scratch (or continue from a checkpoint)",
        description="Train a classifier with AdamW, cosine schedule and optional random "
        "shifts; under torchrun the batch is split over processes (DDP). On an image "
        "folder the head gets one class per class folder.",
    )
    _add_model_source(train_cmd, random_weights=False)
    architecture = train_cmd.add_argument_group(
        "architecture", "change the named architecture (default: as --model defines it)"
    )
    architecture.add_argument(
        "--num-classes",
        type=_positive_int,
        help="classes of the head (default: the image folder's class folders; 10 for digits)",
    )
    architecture.add_argument("--img-size", type=_positive_int, help="image side in pixels")
    architecture.add_argument("--in-chans", type=_positive_int, help="image channels (1 or 3)")
    architecture.add_argument("--patch-size", type=_positive_int, help="patch side in pixels")
    architecture.add_argument("--embed-dim", type=_positive_int, help="width C")
    architecture.add_argument("--depth", type=_positive_int, help="blocks")
    _add_data(train_cmd)
    train_cmd.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    _add_settings(train_cmd, TrainSettings, skip=("distillation", "distill_weight", "temperature"))
    _add_common(train_cmd, threads=True, seed=False)

    slim_cmd = commands.add_parser(
        "slim",
        help="Algorithm 1: find the kept patches of every block, top-down",
        description="Top-down patch slimming: score each block's patches (Eq. 13), add the "
        "best r at a time, tune the block on the reconstruction error E_(l+1) (relative, "
        "on block l+1's kept rows) until E_(l+1) <= eps. By default eps is searched so "
        f"that {100 * SlimSettings().target_reduction:.0f}% of the FLOPs go. The state is "
        "saved after every block in --run-dir; rerunning the same command resumes there.",
    )
    _add_model_source(slim_cmd)
    slim_cmd.add_argument(
        "--data",
        default=DIGITS,
        help="calibration images: 'digits' (the training split) or an image folder",
    )
    slim_cmd.add_argument("--out", type=Path, required=True, help="slimmed checkpoint to write")
    slim_cmd.add_argument("--run-dir", type=Path, help="resumable state (default: <out>.run)")
    _add_settings(slim_cmd, SlimSettings)
    _add_common(slim_cmd, threads=True, seed=False)

    finetune_cmd = commands.add_parser(
        "finetune",
        help="fine-tune a slimmed model with distillation from the dense one",
        description="Cross-entropy plus DeiT-style distillation (soft: KL at temperature "
        "tau; hard: CE on the teacher's argmax) from the dense model. Runs under torchrun "
        "with DDP (the batch is global).",
    )
    finetune_cmd.add_argument(
        "--checkpoint", type=Path, required=True, help="slimmed checkpoint (from patchslim slim)"
    )
    finetune_cmd.add_argument("--teacher", type=Path, required=True, help="dense checkpoint")
    _add_num_heads(finetune_cmd)
    _add_data(finetune_cmd)
    finetune_cmd.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    _add_settings(finetune_cmd, FinetuneSettings)
    _add_common(finetune_cmd, threads=True, seed=False)

    eval_cmd = commands.add_parser(
        "eval",
        help="top-1 accuracy and FLOPs of a checkpoint",
        description="Top-1 accuracy, loss and FLOPs of a dense or slimmed checkpoint.",
    )
    eval_cmd.add_argument("--checkpoint", type=Path, required=True, help="checkpoint to evaluate")
    _add_num_heads(eval_cmd)
    eval_cmd.add_argument(
        "--eval-data",
        "--data",
        dest="eval_data",
        default=DIGITS,
        help="held-out images: 'digits' or an image folder with the model's classes",
    )
    eval_cmd.add_argument("--split", choices=DIGITS_SPLITS, default="test", help="digits split")
    eval_cmd.add_argument("--batch-size", type=_positive_int, default=250, help="batch size")
    _add_threads(eval_cmd)
    eval_cmd.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    bench_cmd = commands.add_parser(
        "bench",
        help="time dense vs slimmed DeiT-Ti/S/B (the paper's Table 2)",
        description="Dense vs slimmed (our ops, and the same maths from plain torch ops) "
        "with plans matching the paper's FLOP reductions; random weights.",
    )
    bench_source = bench_cmd.add_mutually_exclusive_group()
    bench_source.add_argument(
        "--models",
        nargs="+",
        choices=sorted(PAPER_FLOP_REDUCTION),
        default=sorted(PAPER_FLOP_REDUCTION),
        help="random-weight models with a pyramid plan at the paper's FLOP reduction "
        "(default: all)",
    )
    bench_source.add_argument(
        "--checkpoint",
        type=Path,
        help="a slimmed checkpoint instead: its dense weights vs its own plan",
    )
    _add_num_heads(bench_cmd)
    bench_cmd.add_argument("--batch", type=_positive_int, nargs="+", default=[32, 1])
    bench_cmd.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    bench_cmd.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    bench_cmd.add_argument(
        "--repeats",
        type=_positive_int,
        default=30,
        help="timed calls per model (median; default 30)",
    )
    bench_cmd.add_argument(
        "--cuda-graphs", action="store_true", help="also time batch 1 replayed from CUDA graphs"
    )
    bench_cmd.add_argument("--out", type=Path, help="directory for bench.json and bench.md")
    _add_common(bench_cmd, threads=True, seed=False)

    export_cmd = commands.add_parser(
        "export",
        help="write a dense or slimmed checkpoint as an ONNX file of standard operators",
        description="Export to ONNX through torch.export: standard operators only (our ops "
        "decompose to their references), the plan baked in; runs in ONNX Runtime without "
        "patchslim.",
    )
    export_cmd.add_argument("--checkpoint", type=Path, required=True)
    _add_num_heads(export_cmd)
    export_cmd.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    export_batch = export_cmd.add_mutually_exclusive_group()
    export_batch.add_argument(
        "--batch", type=_positive_int, default=1, help="static batch size (default: 1)"
    )
    export_batch.add_argument(
        "--dynamic-batch", action="store_true", help="a symbolic batch dimension instead"
    )
    export_cmd.add_argument(
        "--dtype", choices=sorted(ONNX_DTYPE_NAMES), default="float32", help="default: float32"
    )
    export_cmd.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    demo_cmd = commands.add_parser(
        "demo",
        help="slim the bundled digits ViT end to end (the README's main job)",
        description="Slim the bundled digits model (trained on 4,000 MNIST digits), "
        "fine-tune it, and compare dense vs slimmed: FLOPs, top-1 on the 1,000 held-out "
        "digits, CPU throughput, keep counts; writes two PNGs.",
    )
    demo_cmd.add_argument(
        "--out-dir",
        type=Path,
        default=Path("demo_output"),
        help="where the PNGs, checkpoints and summary go",
    )
    defaults = DemoSettings()
    demo_cmd.add_argument(
        "--eps", type=_nonnegative_float, default=defaults.eps, help="tolerance on E_(l+1)"
    )
    demo_cmd.add_argument("--r", type=_positive_int, default=defaults.r, help="tokens per step")
    demo_cmd.add_argument(
        "--block-epochs",
        type=_nonnegative_int,
        default=defaults.block_epochs,
        help="block tuning epochs per step",
    )
    demo_cmd.add_argument(
        "--calib-size", type=_positive_int, default=defaults.calib_size, help="calibration images"
    )
    demo_cmd.add_argument(
        "--finetune-epochs",
        type=_nonnegative_int,
        default=defaults.finetune_epochs,
        help="fine-tuning epochs after slimming",
    )
    _add_common(demo_cmd, threads=True)

    info = commands.add_parser(
        "info",
        help="how the library was built and which CPU kernels run",
        description="Build and CPU-ISA information.",
    )
    info.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return parser


_MAX_INT = 2**31 - 1  # counts beyond this overflow somewhere (and make no sense)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    if value > _MAX_INT:
        raise argparse.ArgumentTypeError(f"must be at most {_MAX_INT}, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if not 0 <= value <= _MAX_INT:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {_MAX_INT}], got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


# Float options must be finite in float32, the dtype of the weights they scale.
_MAX_FLOAT = MAX_FLOAT32


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value <= _MAX_FLOAT:
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite (float32), got {text}")
    return value


def _add_model_source(parser: argparse.ArgumentParser, *, random_weights: bool = True) -> None:
    """``--model`` or ``--checkpoint``; with ``random_weights``, ``--model`` also needs
    ``--random-weights`` (work on a trained model must not silently start from noise)."""
    source = parser.add_mutually_exclusive_group()
    if random_weights:
        source.add_argument(
            "--model",
            choices=sorted(MODEL_NAMES),
            help="an architecture with random weights (needs --random-weights)",
        )
        parser.add_argument(
            "--random-weights",
            action="store_true",
            help="confirm that --model starts from random weights (for testing)",
        )
    else:
        source.add_argument(
            "--model",
            choices=sorted(MODEL_NAMES),
            default=DEFAULT_MODEL,
            help="architecture, with random weights (digits_vit: the demo model)",
        )
    source.add_argument(
        "--checkpoint",
        type=Path,
        help="our .safetensors checkpoint or a timm/DeiT/T2T-ViT .pth file instead of --model",
    )
    _add_num_heads(parser)


def _add_num_heads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--num-heads",
        type=_positive_int,
        help="attention heads: of a checkpoint without patchslim metadata (a timm/DeiT/T2T "
        "state dict; the weights do not show it), or to change --model's",
    )


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default=DIGITS,
        help="'digits' (the built-in 4,000 training digits) or an image folder "
        "(<root>/<class>/<image>)",
    )
    parser.add_argument(
        "--eval-data",
        help="held-out image folder (default: the 1,000 test digits when --data is digits)",
    )


def _add_settings(
    parser: argparse.ArgumentParser, settings_class: type, *, skip: Sequence[str] = ()
) -> None:
    """One option per field of ``settings_class`` (``--field-name``), with the field's
    default, help and range check (:mod:`patchslim_ext.settings`)."""
    defaults = settings_class()
    for item in dataclasses.fields(settings_class):
        if item.name in skip:
            continue
        kind, _ = value_type(settings_class, item.name)
        option = _OPTION_NAMES.get(item.name, "--" + item.name.replace("_", "-"))
        options: dict[str, Any] = {
            "dest": item.name,
            "default": getattr(defaults, item.name),
            "help": item.metadata["help"],
        }
        if kind is str:
            options["choices"] = item.metadata["choices"]
        else:
            options["type"] = _setting_parser(settings_class, item.name, kind)
            options["metavar"] = "N,N,..." if kind is tuple else item.name.upper()
        parser.add_argument(option, **options)


def _setting_parser(settings_class: type, name: str, kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = _int_list(text) if kind is tuple else kind(text)
            return check_value(settings_class, name, value)
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{name} ")) from None

    parse.__name__ = "integer" if kind is int else "number" if kind is float else "list"
    return parse


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads (default: torch's choice, OMP_NUM_THREADS or the cores; on a "
        "shared machine 1 can be much faster)",
    )


def _add_common(
    parser: argparse.ArgumentParser, *, threads: bool = False, seed: bool = True
) -> None:
    if threads:
        _add_threads(parser)
    if seed:  # settings dataclasses bring their own seed
        parser.add_argument("--seed", type=_seed, default=0, help="random seed")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def _one_line(error: BaseException) -> str:
    """The message of an expected error in one line. An error raised in a DataLoader
    worker comes back wrapped in the worker's traceback: its last line is the message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; an expected error (:class:`PatchslimError`: bad arguments or
    input, outputs that cannot be written, a diverging run) ends in one line on stderr
    and exit code 2. Anything else is a bug and keeps its traceback."""
    try:
        args = build_parser().parse_args(argv)
        # Only now, with --help answered and the options checked: the work needs torch.
        from patchslim_ext import commands

        return commands.run(args)
    except PatchslimError as error:
        print(f"patchslim: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("patchslim: interrupted (slim resumes from its --run-dir)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
