"""The ``patchslim`` command (also ``python -m patchslim_ext``).

Every subcommand has ``--help`` and ``--json`` (a machine-readable summary on
stdout, strict JSON: NaN becomes null). Expected errors
(:class:`~patchslim_ext.errors.PatchslimError`: bad arguments, unreadable files, a run
that diverges) end with a one-line message on stderr and exit code 2; anything else is
a bug and keeps its traceback. Outputs are checked before any work (writable, not a
directory, none of the inputs, also through links) and written through a temporary
file renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from patchslim_ext import _C
from patchslim_ext.benchmark import (
    PAPER_FLOP_REDUCTION,
    TABLE_HEADERS,
    compare,
    describe_machine,
    markdown_table,
    run_benchmarks,
    table_row,
)
from patchslim_ext.checkpoint import load_model, save_model
from patchslim_ext.data import DIGITS, DIGITS_SPLITS, ImageFolder, load_dataset
from patchslim_ext.demo import DemoSettings, format_demo, run_demo
from patchslim_ext.errors import CheckpointError, OutputError, PatchslimError, UsageError
from patchslim_ext.export import ONNX_DTYPES, export_onnx
from patchslim_ext.flops import block_flops, flop_analysis, flops_of
from patchslim_ext.ops import cpu_isa
from patchslim_ext.scoring import SCORE_METHODS
from patchslim_ext.slimming import SCHEDULES, slim
from patchslim_ext.training import (
    DISTILLATION_MODES,
    EpochLog,
    evaluate,
    finetune,
    init_distributed,
    process_group,
    train,
)
from patchslim_ext.vit import MODEL_FACTORIES, VisionTransformer

DEFAULT_MODEL = "digits_vit"
# Dense baselines of the paper's Table 1, which prints them rounded to 0.1 GFLOPs.
PAPER_GFLOPS = {
    "deit_tiny_patch16_224": 1.3,
    "deit_small_patch16_224": 4.6,
    "deit_base_patch16_224": 17.6,
    "t2t_vit_14": 5.2,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors
        raise UsageError(message)

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # Python 3.11's argparse drops a "--" given as a value ("--seed=--") and returns
        # an empty list for an option that takes one value.
        if action.nargs is None and action.option_strings and arg_strings in ([], ["--"]):
            raise UsageError(f"argument {'/'.join(action.option_strings)}: expected one value")
        return super()._get_values(action, arg_strings)


def _build_model(args: argparse.Namespace) -> tuple[str, VisionTransformer]:
    if args.checkpoint is not None:
        return str(args.checkpoint), _load(args.checkpoint, "--checkpoint", args.num_heads)
    torch.manual_seed(getattr(args, "seed", 0))
    return args.model, MODEL_FACTORIES[args.model]()


def _dataset(source: str, split: str, model: VisionTransformer) -> Any:
    config = model.config
    try:
        data = load_dataset(source, split, config.img_size, config.in_chans)
    except (OSError, PatchslimError) as error:
        raise UsageError(f"--data {source}: {error}") from None
    _check_classes(source, data, model)
    return data


def _check_classes(source: str, data: Any, model: VisionTransformer) -> None:
    """An image folder with more classes than the model's head has outputs is refused."""
    classes = getattr(data, "classes", None)
    if classes is not None and len(classes) > model.config.num_classes:
        raise UsageError(
            f"--data {source}: {len(classes)} class folders, but the model has "
            f"{model.config.num_classes} classes"
        )


def _check_image_files(data: Any) -> None:
    """Check an image folder's files before any work (see ImageFolder.check_files)."""
    if isinstance(data, ImageFolder):
        data.check_files()


def _eval_dataset(args: argparse.Namespace, model: VisionTransformer) -> Any:
    """The held-out set: the digits' test split, or ``--eval-data`` for image folders."""
    if args.eval_data is not None:
        held_out = _dataset(args.eval_data, "test", model)
        _check_image_files(held_out)  # read at the end: check it before the work
        return held_out
    if args.data == DIGITS:
        return _dataset(DIGITS, "test", model)
    return None


def _report(args: argparse.Namespace, summary: dict[str, Any], lines: Sequence[str]) -> None:
    if process_group()[0] != 0:
        return
    if args.json:
        print(_json_text(summary))
    else:
        for line in lines:
            print(line)


def _json_text(value: Any, **options: Any) -> str:
    """Strict JSON: NaN and infinities (never valid JSON) become null."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **options)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return value


def _check_outputs(
    files: Sequence[tuple[str, Path | None]] = (),
    directories: Sequence[tuple[str, Path | None]] = (),
    inputs: Sequence[tuple[str, Path | None]] = (),
) -> None:
    """Before any work: every output file and directory (``(option, path)``) can be
    written, is not a directory (files) or a file (directories), and is none of the
    inputs, also through symbolic or hard links; no input lies in an output directory."""
    given = [(option, Path(path)) for option, path in inputs if path is not None]
    outputs = [(option, Path(path), False) for option, path in files if path is not None]
    outputs += [(option, Path(path), True) for option, path in directories if path is not None]
    for option, path, is_directory in outputs:
        if is_directory and path.exists() and not path.is_dir():
            raise OutputError(f"{option} {path}: exists and is not a directory")
        if not is_directory and path.is_dir():
            raise OutputError(f"{option} {path}: is a directory; give a file name")
        ancestor = path if is_directory and path.is_dir() else path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputError(f"{option} {path}: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputError(f"{option} {path}: {ancestor} is not writable")
        if path.exists() and not is_directory and not os.access(path, os.W_OK):
            raise OutputError(f"{option} {path}: is not writable")
        for input_option, source in given:
            if _same_file(path, source):
                raise OutputError(
                    f"{option} {path} is also {input_option}: it would overwrite its input; "
                    "write elsewhere"
                )
            if is_directory and source.resolve().is_relative_to(path.resolve()):
                raise OutputError(f"{input_option} {source} lies in {option} {path}")
    for index, (option, path, _) in enumerate(outputs):
        for other_option, other, _ in outputs[index + 1 :]:
            if _same_file(path, other):
                raise OutputError(f"{option} and {other_option} are the same path, {path}")


def _same_file(first: Path, second: Path) -> bool:
    if first.resolve() == second.resolve():
        return True
    try:
        return first.exists() and second.exists() and os.path.samefile(first, second)
    except OSError:
        return False


def _save_output(model: VisionTransformer, path: Path) -> None:
    """``save_model`` (a temporary file renamed over ``path``), leaving nothing behind
    when it fails."""
    try:
        save_model(model, path)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error}") from None
    finally:
        path.with_name(path.name + ".partial").unlink(missing_ok=True)


def _loop_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options ``train`` and ``finetune`` share, from their common arguments."""
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_shift": args.shift,
        "seed": args.seed,
        "num_workers": args.workers,
        "progress": not args.json,
        "on_epoch_end": lambda log: _progress_line(args, log),
    }


def _check_loop_arguments(args: argparse.Namespace, model: VisionTransformer) -> None:
    if args.shift > model.config.img_size:
        raise UsageError(
            f"--shift {args.shift}: at most the image size ({model.config.img_size} pixels)"
        )


def _cmd_train(args: argparse.Namespace) -> int:
    init_distributed()
    _check_outputs(files=[("--out", args.out)], inputs=[("--checkpoint", args.checkpoint)])
    name, model = _build_model(args)
    _check_loop_arguments(args, model)
    data = _dataset(args.data, "train", model)
    held_out = _eval_dataset(args, model)
    start = time.perf_counter()
    logs = train(
        model,
        data,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        **_loop_options(args),
    )
    seconds = time.perf_counter() - start
    headline = f"trained {name} on {len(data)} images in {seconds:.0f} s -> {args.out}"
    _save_trained(args, model, held_out, logs, headline, model_name=name, seconds=seconds)
    return 0


def _save_trained(
    args: argparse.Namespace,
    model: VisionTransformer,
    held_out: Any,
    logs: Sequence[EpochLog],
    headline: str,
    **details: Any,
) -> None:
    """Evaluate on the held-out set, save ``args.out`` (rank 0) and report."""
    accuracy = evaluate(model, held_out) if held_out is not None else None
    if process_group()[0] == 0:
        _save_output(model, args.out)
    summary = {
        **details,
        "checkpoint": str(args.out),
        "epochs": [log.to_dict() for log in logs],
        "held_out": accuracy,
    }
    lines = [headline]
    if accuracy is not None:
        lines.append(f"held-out top-1: {accuracy['top1']:.2f}% ({accuracy['images']} images)")
    _report(args, summary, lines)


def _dense_model(args: argparse.Namespace) -> tuple[str, VisionTransformer]:
    name, model = _build_model(args)
    if model.plan is not None:
        raise UsageError(f"{name} is already slimmed; give the dense model")
    return name, model


def _load(path: Path, role: str, num_heads: int | None = None) -> VisionTransformer:
    try:
        return load_model(path, num_heads=num_heads)
    except (FileNotFoundError, CheckpointError) as error:
        raise UsageError(f"{role}: {error}") from None


def _cmd_slim(args: argparse.Namespace) -> int:
    init_distributed()
    run_dir = args.run_dir or args.out.with_name(args.out.name + ".run")
    _check_outputs(
        files=[("--out", args.out)],
        directories=[("--run-dir", run_dir)],
        inputs=[("--checkpoint", args.checkpoint)],
    )
    name, model = _dense_model(args)
    calib = _dataset(args.data, "train", model)
    if args.calib_size > len(calib):
        raise UsageError(
            f"--calib-size {args.calib_size}: the calibration data {args.data} holds only "
            f"{len(calib)} images"
        )
    result = slim(
        model,
        calib,
        eps=args.eps,
        r=args.r,
        block_epochs=args.block_epochs,
        score=args.score,
        schedule=args.schedule,
        flops_ratio=args.flops_ratio,
        keep_counts=args.keep_counts,
        calib_size=args.calib_size,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        run_dir=run_dir,
        progress=not args.json,
    )
    if process_group()[0] == 0:
        _save_output(result.model, args.out)
    dense = flops_of(model.config)
    summary = {
        "model": name,
        "checkpoint": str(args.out),
        "run_dir": str(run_dir),
        "keep_counts": list(result.plan.keep_counts),
        "dense_flops": dense,
        "slim_flops": result.flops,
        "flop_reduction": 1 - result.flops / dense,
        "blocks": [asdict(entry) for entry in result.log],
    }
    lines = [f"{'block':>5}  {'kept':>5}  {'steps':>5}  {'E_(l+1)':>9}  {'seconds':>7}"]
    for entry in sorted(result.log, key=lambda e: e.block):
        lines.append(
            f"{entry.block:>5}  {entry.kept:>5}  {len(entry.errors):>5}  "
            f"{entry.errors[-1]:>9.5f}  {entry.seconds:>7.1f}"
        )
    lines.append(
        f"keep counts {list(result.plan.keep_counts)}: {dense / 1e9:.4f} -> "
        f"{result.flops / 1e9:.4f} GFLOPs ({100 * summary['flop_reduction']:.1f}% fewer) "
        f"-> {args.out}"
    )
    _report(args, summary, lines)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    init_distributed()
    _check_outputs(
        files=[("--out", args.out)],
        inputs=[("--checkpoint", args.checkpoint), ("--teacher", args.teacher)],
    )
    slimmed = _load(args.checkpoint, "--checkpoint", args.num_heads)
    teacher = _load(args.teacher, "--teacher", args.num_heads)
    if teacher.plan is not None:
        raise UsageError("--teacher must be the dense model")
    if teacher.config != slimmed.config:
        raise UsageError("--teacher and --checkpoint have different architectures")
    _check_loop_arguments(args, slimmed)
    data = _dataset(args.data, "train", slimmed)
    held_out = _eval_dataset(args, slimmed)
    logs = finetune(
        slimmed,
        teacher,
        data,
        distillation=args.distillation,
        distill_weight=args.distill_weight,
        temperature=args.temperature,
        **_loop_options(args),
    )
    headline = f"fine-tuned {args.checkpoint} for {args.epochs} epochs -> {args.out}"
    _save_trained(args, slimmed, held_out, logs, headline)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    init_distributed()
    model = _load(args.checkpoint, "--checkpoint", args.num_heads)
    if args.data == DIGITS:
        data = _dataset(DIGITS, args.split, model)
    else:
        data = _dataset(args.data, "test", model)
    accuracy = evaluate(model, data, batch_size=args.batch_size, progress=not args.json)
    keep_counts = model.keep_counts
    summary = {
        "checkpoint": str(args.checkpoint),
        **accuracy,
        "flops": flops_of(model.config, keep_counts),
        "dense_flops": flops_of(model.config),
        "keep_counts": keep_counts,
    }
    lines = [
        f"{args.checkpoint}: top-1 {accuracy['top1']:.2f}% on {accuracy['images']} images, "
        f"loss {accuracy['loss']:.4f}, {summary['flops'] / 1e9:.4f} GFLOPs"
    ]
    _report(args, summary, lines)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    _check_outputs(directories=[("--out", args.out)])
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: expected cpu, cuda or cuda:<index>") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: expected cpu, cuda or cuda:<index>")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: only {torch.cuda.device_count()} GPU(s) here")
    if args.cuda_graphs and device.type != "cuda":
        raise UsageError("--cuda-graphs needs --device cuda")
    timing = {
        "dtype": getattr(torch, args.dtype),
        "device": device,
        "repeats": args.repeats,
    }
    if args.checkpoint is None:
        rows = run_benchmarks(
            args.models,
            batches=args.batch,
            cuda_graphs=args.cuda_graphs,
            progress=not args.json,
            **timing,
        )
    else:
        model = _load(args.checkpoint, "--checkpoint", args.num_heads)
        plan = model.plan
        if plan is None:
            raise UsageError(f"--checkpoint {args.checkpoint} is not slimmed (patchslim slim)")
        model.set_plan(None)
        jobs = [(batch, False) for batch in args.batch] + [(1, True)] * args.cuda_graphs
        rows = [
            compare(str(args.checkpoint), model, plan, batch=batch, cuda_graphs=graphs, **timing)
            for batch, graphs in jobs
        ]
    records = [row.to_dict() for row in rows]
    table = markdown_table(TABLE_HEADERS, [table_row(row) for row in rows])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        _write_text(args.out / "bench.json", _json_text(records, indent=2))
        _write_text(args.out / "bench.md", f"{describe_machine(device)}\n\n{table}\n")
    _report(args, {"machine": describe_machine(device), "rows": records}, [table])
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _check_outputs(files=[("--out", args.out)], inputs=[("--checkpoint", args.checkpoint)])
    model = _load(args.checkpoint, "--checkpoint", args.num_heads)
    export_onnx(
        model,
        args.out,
        batch_size=args.batch,
        dynamic_batch=args.dynamic_batch,
        dtype=ONNX_DTYPES[args.dtype],
    )
    summary = {
        "checkpoint": str(args.checkpoint),
        "onnx": str(args.out),
        "keep_counts": model.keep_counts,
        "batch": "dynamic" if args.dynamic_batch else args.batch,
        "dtype": args.dtype,
        "bytes": args.out.stat().st_size,
    }
    slimmed = "slimmed" if model.plan is not None else "dense"
    lines = [
        f"{args.checkpoint} ({slimmed}) -> {args.out}: standard ONNX operators, batch "
        f"{summary['batch']}, {args.dtype}, {summary['bytes'] / 2**20:.1f} MiB"
    ]
    _report(args, summary, lines)
    return 0


def _write_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file renamed over it."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error}") from None
    finally:
        partial.unlink(missing_ok=True)


def _cmd_demo(args: argparse.Namespace) -> int:
    _check_outputs(directories=[("--out-dir", args.out_dir)])
    summary = run_demo(
        args.out_dir,
        DemoSettings(
            eps=args.eps,
            r=args.r,
            block_epochs=args.block_epochs,
            calib_size=args.calib_size,
            finetune_epochs=args.finetune_epochs,
            seed=args.seed,
        ),
        progress=not args.json,
    )
    _report(args, summary, format_demo(summary))
    return 0


def _progress_line(args: argparse.Namespace, log: EpochLog) -> None:
    if not args.json and process_group()[0] == 0:
        print(
            f"epoch {log.epoch}: loss {log.loss:.4f}, lr {log.lr:.2e}, {log.seconds:.1f} s",
            file=sys.stderr,
        )


def _flops_report(name: str, model: VisionTransformer) -> dict[str, Any]:
    config = model.config
    keep_counts = model.keep_counts
    images = torch.zeros(1, config.in_chans, config.img_size, config.img_size)
    # fvcore logs "never called" for modules it cannot see; our report covers all.
    logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
    with torch.no_grad():
        analysis = flop_analysis(model.eval(), (images,))
        per_module = analysis.by_module()
        total = int(analysis.total())
    # A slimmed model's inference runs the block ops in place, outside the block
    # modules, so fvcore has no per-block figure for it.
    blocks = [
        {
            "block": index + 1,
            "tokens": kept,
            "fvcore": int(per_module[f"blocks.{index}"])
            if per_module.get(f"blocks.{index}")
            else None,
            "analytic": block_flops(config, kept),
        }
        for index, kept in enumerate(keep_counts)
    ]
    return {
        "model": name,
        "config": config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "blocks": blocks,
        "fvcore_total": total,
        "analytic_total": flops_of(config, keep_counts),
        "dense_total": flops_of(config),
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
        fvcore = "-" if row["fvcore"] is None else f"{row['fvcore'] / 1e6:.3f}"
        print(
            f"{row['block']:>5}  {row['tokens']:>6}  {fvcore:>14}  {row['analytic'] / 1e6:>15.3f}"
        )
    line = (
        f"total: fvcore {report['fvcore_total'] / 1e9:.4f} GFLOPs, "
        f"analytic {report['analytic_total'] / 1e9:.4f} GFLOPs"
    )
    if report["analytic_total"] != report["dense_total"]:
        reduction = 1 - report["analytic_total"] / report["dense_total"]
        line += f", {100 * reduction:.1f}% below dense"
    if report["paper_gflops"] is not None:
        line += f", paper (Table 1) {report['paper_gflops']:.1f} GFLOPs"
    print(line)
    if report["unsupported_ops"]:
        print(f"ops without a FLOP handle: {report['unsupported_ops']}")


def _cmd_flops(args: argparse.Namespace) -> int:
    name, model = _build_model(args)
    report = _flops_report(name, model)
    if args.json:
        print(_json_text(report))
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
        print(_json_text(info))
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
    _add_num_heads(flops)
    flops.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    flops.set_defaults(handler=_cmd_flops)

    train_cmd = commands.add_parser(
        "train",
        help="train a ViT from scratch (or continue from a checkpoint)",
        description="Train a classifier with AdamW, cosine schedule and optional random "
        "shifts; under torchrun the batch is split over processes (DDP).",
    )
    _add_model_source(train_cmd)
    _add_data(train_cmd)
    _add_loop_arguments(train_cmd, epochs=30, lr=1e-3)
    train_cmd.add_argument("--weight-decay", type=_nonnegative_float, default=0.05)
    train_cmd.add_argument("--warmup-epochs", type=_nonnegative_float, default=2.0)
    train_cmd.add_argument("--label-smoothing", type=_fraction, default=0.1, help="in [0, 1]")
    train_cmd.set_defaults(handler=_cmd_train)

    slim_cmd = commands.add_parser(
        "slim",
        help="Algorithm 1: find the kept patches of every block, top-down",
        description="Top-down patch slimming: score each block's patches (Eq. 13), add the "
        "best r at a time, tune the block on the reconstruction error E_(l+1) (relative, "
        "on block l+1's kept rows) until E_(l+1) <= eps. The state is saved after every "
        "block in --run-dir; rerunning the same command resumes there.",
    )
    _add_model_source(slim_cmd)
    slim_cmd.add_argument(
        "--data",
        default=DIGITS,
        help="calibration images: 'digits' "
        "(the training split) or an image folder (default: digits)",
    )
    slim_cmd.add_argument("--out", type=Path, required=True, help="slimmed checkpoint to write")
    slim_cmd.add_argument("--run-dir", type=Path, help="resumable state (default: <out>.run)")
    slim_cmd.add_argument(
        "--eps", type=_nonnegative_float, default=0.01, help="tolerance on E (0.01)"
    )
    slim_cmd.add_argument("--r", type=_positive_int, default=10, help="patches per step (10)")
    slim_cmd.add_argument(
        "--block-epochs",
        type=_nonnegative_int,
        default=3,
        help="block tuning epochs per step (3; 0: no tuning)",
    )
    slim_cmd.add_argument("--score", choices=SCORE_METHODS, default="impact")
    slim_cmd.add_argument("--schedule", choices=SCHEDULES, default="tolerance")
    slim_cmd.add_argument(
        "--flops-ratio", type=_ratio, help="slimmed/dense FLOPs for --schedule uniform, in (0, 1]"
    )
    slim_cmd.add_argument(
        "--keep-counts", type=_int_list, help="comma-separated counts for --schedule fixed"
    )
    slim_cmd.add_argument(
        "--calib-size", type=_positive_int, default=1024, help="calibration images (1024)"
    )
    slim_cmd.add_argument("--batch-size", type=_positive_int, default=64)
    slim_cmd.add_argument(
        "--lr", type=_positive_float, default=1e-4, help="block tuning learning rate (1e-4)"
    )
    _add_common(slim_cmd)
    slim_cmd.set_defaults(handler=_cmd_slim)

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
    _add_loop_arguments(finetune_cmd, epochs=3, lr=1e-4)
    finetune_cmd.add_argument("--distillation", choices=DISTILLATION_MODES, default="soft")
    finetune_cmd.add_argument(
        "--distill-weight", type=_fraction, default=0.5, help="alpha, in [0, 1] (0.5)"
    )
    finetune_cmd.add_argument("--temperature", type=_positive_float, default=1.0, help="tau")
    finetune_cmd.set_defaults(handler=_cmd_finetune)

    eval_cmd = commands.add_parser(
        "eval",
        help="top-1 accuracy and FLOPs of a checkpoint",
        description="Top-1 accuracy, loss and FLOPs of a dense or slimmed checkpoint.",
    )
    eval_cmd.add_argument("--checkpoint", type=Path, required=True)
    _add_num_heads(eval_cmd)
    eval_cmd.add_argument(
        "--data", default=DIGITS, help="'digits' or an image folder (default: digits)"
    )
    eval_cmd.add_argument(
        "--split", choices=DIGITS_SPLITS, default="test", help="digits split (default: test)"
    )
    eval_cmd.add_argument("--batch-size", type=_positive_int, default=250)
    eval_cmd.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    eval_cmd.set_defaults(handler=_cmd_eval)

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
    bench_cmd.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    bench_cmd.set_defaults(handler=_cmd_bench)

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
        "--dtype", choices=sorted(ONNX_DTYPES), default="float32", help="default: float32"
    )
    export_cmd.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    export_cmd.set_defaults(handler=_cmd_export)

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
        help="where the PNGs, checkpoints and summary go (demo_output)",
    )
    defaults = DemoSettings()
    demo_cmd.add_argument("--eps", type=_nonnegative_float, default=defaults.eps)
    demo_cmd.add_argument("--r", type=_positive_int, default=defaults.r)
    demo_cmd.add_argument("--block-epochs", type=_nonnegative_int, default=defaults.block_epochs)
    demo_cmd.add_argument("--calib-size", type=_positive_int, default=defaults.calib_size)
    demo_cmd.add_argument(
        "--finetune-epochs", type=_nonnegative_int, default=defaults.finetune_epochs
    )
    demo_cmd.add_argument("--seed", type=_seed, default=defaults.seed)
    demo_cmd.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    demo_cmd.set_defaults(handler=_cmd_demo)

    info = commands.add_parser(
        "info",
        help="how the library was built and which CPU kernels run",
        description="Build and CPU-ISA information.",
    )
    info.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    info.set_defaults(handler=_cmd_info)
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
_MAX_FLOAT = float(torch.finfo(torch.float32).max)


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value <= _MAX_FLOAT:
        raise argparse.ArgumentTypeError(f"must be positive and finite (float32), got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value <= _MAX_FLOAT:
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite (float32), got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        choices=sorted(MODEL_FACTORIES),
        default=DEFAULT_MODEL,
        help=f"architecture with random weights (default: {DEFAULT_MODEL}, the demo model)",
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
        help="attention heads of a checkpoint without patchslim metadata (a timm/DeiT/T2T "
        "state dict; the weights do not show it)",
    )


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default=DIGITS,
        help="'digits' (the built-in 4,000 training digits) or an image folder "
        "(<root>/<class>/<image>) (default: digits)",
    )
    parser.add_argument(
        "--eval-data",
        help="held-out image folder (default: the 1,000 test digits when --data is digits)",
    )


def _add_loop_arguments(parser: argparse.ArgumentParser, *, epochs: int, lr: float) -> None:
    """The arguments of ``train`` and ``finetune`` that :func:`_loop_options` reads."""
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    parser.add_argument("--epochs", type=_positive_int, default=epochs)
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="global batch")
    parser.add_argument("--lr", type=_positive_float, default=lr, help="peak learning rate")
    parser.add_argument(
        "--shift",
        type=_nonnegative_int,
        default=0,
        help="random shifts of up to this many pixels (augmentation; 0: none)",
    )
    parser.add_argument(
        "--workers", type=_nonnegative_int, default=0, help="data-loading processes"
    )
    _add_common(parser)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def _check_cpu_isa() -> None:
    """A bad ``PATCHSLIM_CPU_ISA`` is reported before any work, not at the first kernel."""
    try:
        cpu_isa()
    except (RuntimeError, ValueError) as error:
        raise UsageError(str(error).strip().splitlines()[0]) from None


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
        args = _parser().parse_args(argv)
        _check_cpu_isa()
        return args.handler(args)
    except PatchslimError as error:
        print(f"patchslim: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("patchslim: interrupted (slim resumes from its --run-dir)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
