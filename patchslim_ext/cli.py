"""The ``patchslim`` command (also ``python -m patchslim_ext``).

Every subcommand has ``--help`` and ``--json`` (a machine-readable summary on
stdout). Bad arguments and unreadable files end with a one-line message on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from patchslim_ext import _C
from patchslim_ext.checkpoint import CheckpointError, load_model
from patchslim_ext.flops import block_flops, flop_analysis, flops_of
from patchslim_ext.ops import cpu_isa
from patchslim_ext.vit import MODEL_FACTORIES, VisionTransformer

DEFAULT_MODEL = "digits_vit"
# Dense baselines of the paper's Table 1, which prints them rounded to 0.1 GFLOPs.
PAPER_GFLOPS = {
    "deit_tiny_patch16_224": 1.3,
    "deit_small_patch16_224": 4.6,
    "deit_base_patch16_224": 17.6,
}


class UsageError(Exception):
    """A bad argument or input file: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors
        raise UsageError(message)


def _build_model(args: argparse.Namespace) -> tuple[str, VisionTransformer]:
    if args.checkpoint is not None:
        try:
            return str(args.checkpoint), load_model(args.checkpoint)
        except (FileNotFoundError, CheckpointError) as error:
            raise UsageError(str(error)) from None
    return args.model, MODEL_FACTORIES[args.model]()


def _flops_report(name: str, model: VisionTransformer) -> dict[str, Any]:
    config = model.config
    images = torch.zeros(1, config.in_chans, config.img_size, config.img_size)
    # fvcore logs "never called" for modules it cannot see; our report covers all.
    logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
    with torch.no_grad():
        analysis = flop_analysis(model.eval(), (images,))
        per_module = analysis.by_module()
        total = int(analysis.total())
    blocks = [
        {
            "block": index + 1,
            "tokens": config.num_tokens,
            "fvcore": int(per_module[f"blocks.{index}"]),
            "analytic": block_flops(config, config.num_tokens),
        }
        for index in range(config.depth)
    ]
    return {
        "model": name,
        "config": config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "blocks": blocks,
        "fvcore_total": total,
        "analytic_total": flops_of(config),
        "unsupported_ops": dict(analysis.unsupported_ops()),
        "paper_gflops": PAPER_GFLOPS.get(name),
    }


def _print_flops(report: dict[str, Any]) -> None:
    cfg = report["config"]
    print(
        f"{report['model']}: {cfg['img_size']}px, patch {cfg['patch_size']}, "
        f"C={cfg['embed_dim']}, {cfg['depth']} blocks, {cfg['num_heads']} heads, "
        f"{report['parameters'] / 1e6:.2f}M parameters"
    )
    print(f"{'block':>5}  {'tokens':>6}  {'fvcore MFLOPs':>14}  {'analytic MFLOPs':>15}")
    for row in report["blocks"]:
        print(
            f"{row['block']:>5}  {row['tokens']:>6}  {row['fvcore'] / 1e6:>14.3f}  "
            f"{row['analytic'] / 1e6:>15.3f}"
        )
    line = (
        f"total: fvcore {report['fvcore_total'] / 1e9:.4f} GFLOPs, "
        f"analytic {report['analytic_total'] / 1e9:.4f} GFLOPs"
    )
    if report["paper_gflops"] is not None:
        line += f", paper (Table 1) {report['paper_gflops']:.1f} GFLOPs"
    print(line)
    if report["unsupported_ops"]:
        print(f"ops without a FLOP handle: {report['unsupported_ops']}")


def _cmd_flops(args: argparse.Namespace) -> int:
    name, model = _build_model(args)
    report = _flops_report(name, model)
    if args.json:
        print(json.dumps(report))
    else:
        _print_flops(report)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    info = dict(_C.build_info())
    info.update(
        detected_cpu_isa=_C.detected_cpu_isa(),
        active_cpu_isa=cpu_isa(),
        torch_runtime=torch.__version__,
        cuda_available=torch.cuda.is_available(),
        threads=torch.get_num_threads(),
    )
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0


def _parser() -> argparse.ArgumentParser:
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
        choices=sorted(MODEL_FACTORIES),
        default=DEFAULT_MODEL,
        help=f"architecture with random weights (default: {DEFAULT_MODEL}, the demo model)",
    )
    source.add_argument(
        "--checkpoint", type=Path, help="a .safetensors or .pth checkpoint instead of --model"
    )
    flops.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    flops.set_defaults(handler=_cmd_flops)

    info = commands.add_parser(
        "info",
        help="how the library was built and which CPU kernels run",
        description="Build and CPU-ISA information.",
    )
    info.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    info.set_defaults(handler=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return args.handler(args)
    except (UsageError, ValueError) as error:
        print(f"patchslim: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
