"""The work of the ``patchslim`` subcommands (:mod:`patchslim_ext.cli` parses).

:mod:`patchslim_ext.cli` builds the parser without torch, so that ``patchslim --help``
and argument errors are answered at once; :func:`run` is called with the parsed
arguments and loads torch, the compiled ops and the rest of the package.

Outputs are checked before any work (writable, not a directory, none of the inputs,
also through links) and written atomically (:func:`patchslim_ext.files.atomic_write`).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from tqdm.auto import tqdm

from patchslim_ext import _C
from patchslim_ext.benchmark import (
    TABLE_HEADERS,
    compare,
    cpu_has_native_bf16,
    describe_machine,
    markdown_table,
    run_benchmarks,
    table_row,
    timing_jobs,
)
from patchslim_ext.checkpoint import load_model, save_model
from patchslim_ext.data import DIGITS_CLASSES, ImageFolder, load_dataset
from patchslim_ext.demo import format_demo, run_demo
from patchslim_ext.errors import CheckpointError, OutputError, PatchslimError, UsageError
from patchslim_ext.export import ONNX_DTYPES, export_onnx
from patchslim_ext.files import atomic_write
from patchslim_ext.flops import block_flops, flop_analysis, flops_of
from patchslim_ext.ops import cpu_isa
from patchslim_ext.runtime import (
    init_distributed,
    oversubscription_warning,
    process_group,
    set_threads,
)
from patchslim_ext.settings import (
    DIGITS,
    DemoSettings,
    FinetuneSettings,
    SlimSettings,
    TrainSettings,
)
from patchslim_ext.slimming import describe_eps, slim
from patchslim_ext.training import EpochLog, evaluate, finetune, train
from patchslim_ext.vit import MODEL_FACTORIES, VisionTransformer

logger = logging.getLogger("patchslim")

# Architecture options of `train`: ViTConfig fields a named architecture can change.
_ARCHITECTURE_OPTIONS = ("img_size", "in_chans", "patch_size", "embed_dim", "depth")
# Dense baselines of the paper's Table 1, which prints them rounded to 0.1 GFLOPs.
PAPER_GFLOPS = {
    "deit_tiny_patch16_224": 1.3,
    "deit_small_patch16_224": 4.6,
    "deit_base_patch16_224": 17.6,
    "t2t_vit_14": 5.2,
}


def _build_model(
    args: argparse.Namespace, architecture: dict[str, int] | None = None
) -> tuple[str, VisionTransformer]:
    """The model of ``--checkpoint``, or of ``--model`` with random weights (seeded),
    changed by ``architecture`` (ViTConfig fields)."""
    if args.checkpoint is not None:
        return str(args.checkpoint), _load(args.checkpoint, "--checkpoint", args.num_heads)
    if args.model is None or not getattr(args, "random_weights", True):
        raise UsageError(
            "give the model to work on: --checkpoint FILE (a trained model), or --model NAME "
            "--random-weights (an untrained one, for testing)"
        )
    torch.manual_seed(getattr(args, "seed", 0))
    try:
        return args.model, MODEL_FACTORIES[args.model](**(architecture or {}))
    except ValueError as error:
        raise UsageError(f"--model {args.model}: {error}") from None


def _dataset(
    source: str, split: str, model: VisionTransformer, option: str = "--data", *, exact: bool
) -> Any:
    """The digits or an image folder, read at the model's image size and channels; its
    classes (the folders, or the 10 digits) are checked against the model's head:
    ``exact`` (labels are used) refuses a different count, otherwise fewer class folders
    than the head's classes are a warning (more are refused; the digits are not checked)."""
    config = model.config
    try:
        data = load_dataset(source, split, config.img_size, config.in_chans)
    except (OSError, PatchslimError) as error:
        raise UsageError(f"{option} {source}: {error}") from None
    if source == DIGITS and exact and config.num_classes != DIGITS_CLASSES:
        raise UsageError(
            f"{option} digits: {DIGITS_CLASSES} classes (the digits 0-9), but the model's head "
            f"has {config.num_classes} classes"
        )
    classes = getattr(data, "classes", None)
    if classes is not None and len(classes) != config.num_classes:
        message = (
            f"{option} {source}: {len(classes)} class folders "
            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}), but the model's "
            f"head has {config.num_classes} classes"
        )
        if exact or len(classes) > config.num_classes:
            raise UsageError(f"{message}; labels are the sorted folder names")
        logger.warning(message)
    return data


def _check_image_files(data: Any) -> None:
    """Check an image folder's files before any work (see ImageFolder.check_files)."""
    if isinstance(data, ImageFolder):
        data.check_files()


def _eval_dataset(args: argparse.Namespace, model: VisionTransformer) -> Any:
    """The held-out set: the digits' test split, or ``--eval-data`` for image folders."""
    if args.eval_data is not None:
        held_out = _dataset(args.eval_data, "test", model, "--eval-data", exact=True)
        _check_image_files(held_out)  # read at the end: check it before the work
        return held_out
    if args.data == DIGITS:
        return _dataset(DIGITS, "test", model, exact=True)
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
    """``save_model`` (atomic: nothing is left behind when it fails), its failure to
    write reported as an :class:`OutputError`."""
    try:
        save_model(model, path)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error}") from None


def _settings(args: argparse.Namespace, settings_class: type) -> Any:
    """``settings_class`` from the options :func:`_add_settings` added (the fields it
    skipped keep their defaults)."""
    given = {
        item.name: getattr(args, item.name)
        for item in dataclasses.fields(settings_class)
        if hasattr(args, item.name)
    }
    return settings_class(**given)


def _start_long_run(args: argparse.Namespace) -> None:
    """Threads as asked (``--threads``), and a warning when they fight other processes
    for the cores."""
    set_threads(args.threads)
    if process_group()[0] == 0 and (warning := oversubscription_warning()):
        logger.warning(warning)


def _check_shift(settings: TrainSettings, model: VisionTransformer) -> None:
    if settings.max_shift > model.config.img_size:
        raise UsageError(
            f"--shift {settings.max_shift}: at most the image size ({model.config.img_size} pixels)"
        )


def _architecture(args: argparse.Namespace) -> dict[str, int]:
    """The ViTConfig fields given on the command line (``train``'s architecture options);
    the number of classes defaults to the image folder's class folders."""
    changes = {
        name: getattr(args, name)
        for name in _ARCHITECTURE_OPTIONS
        if getattr(args, name) is not None
    }
    if args.num_heads is not None:
        changes["num_heads"] = args.num_heads
    num_classes = args.num_classes
    if num_classes is not None and num_classes < 2:
        raise UsageError(f"--num-classes {num_classes}: a classifier needs at least 2 classes")
    if num_classes is None and args.data != DIGITS:
        root = Path(args.data)
        if root.is_dir():
            num_classes = sum(1 for entry in root.iterdir() if entry.is_dir())
            if num_classes < 2:
                raise UsageError(
                    f"--data {args.data}: {num_classes} class folder(s); a classifier needs at "
                    "least 2 (<root>/<class>/<image>)"
                )
    if num_classes is not None:
        changes["num_classes"] = num_classes
    return changes


def _cmd_train(args: argparse.Namespace) -> int:
    init_distributed()
    _check_outputs(files=[("--out", args.out)], inputs=[("--checkpoint", args.checkpoint)])
    settings = _settings(args, TrainSettings)
    architecture = _architecture(args) if args.checkpoint is None else {}
    name, model = _build_model(args, architecture)
    _check_shift(settings, model)
    data = _dataset(args.data, "train", model, exact=True)
    _warn_about_colour(data, model)
    held_out = _eval_dataset(args, model)
    config = model.config
    logger.info(
        "%s: %d×%d×%d images, patch %d, %d blocks, C=%d, %d heads, %d classes",
        name, config.in_chans, config.img_size, config.img_size, config.patch_size,
        config.depth, config.embed_dim, config.num_heads, config.num_classes,
    )  # fmt: skip
    _start_long_run(args)
    start = time.perf_counter()
    logs = train(
        model,
        data,
        settings,
        progress=not args.json,
        on_epoch_end=lambda log: _progress_line(args, log),
    )
    seconds = time.perf_counter() - start
    headline = f"trained {name} on {len(data)} images in {seconds:.0f} s -> {args.out}"
    _save_trained(
        args, model, held_out, logs, headline, model_name=name, seconds=seconds,
        settings=settings.to_dict(),
    )  # fmt: skip
    return 0


def _warn_about_colour(data: Any, model: VisionTransformer) -> None:
    """A greyscale model trained on colour images reads them as grey: say so."""
    if isinstance(data, ImageFolder) and model.config.in_chans == 1 and data.has_colour():
        logger.warning(
            "the images are in colour but the model reads 1 channel: they are converted to "
            "greyscale (give --in-chans 3 to keep the colour)"
        )


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
    if path.is_dir():
        raise UsageError(f"{role} {path}: is a directory; give a checkpoint file")
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
    settings = _settings(args, SlimSettings)
    name, model = _dense_model(args)
    calib = _dataset(args.data, "train", model, exact=False)
    _start_long_run(args)
    result = slim(model, calib, settings, run_dir=run_dir, progress=not args.json)
    if process_group()[0] == 0:
        _save_output(result.model, args.out)
    dense = flops_of(model.config)
    summary = {
        "model": name,
        "checkpoint": str(args.out),
        "run_dir": str(run_dir),
        "settings": settings.to_dict(),
        "keep_counts": list(result.plan.keep_counts),
        "dense_flops": dense,
        "slim_flops": result.flops,
        "flop_reduction": result.flops_reduction,
        "eps": result.eps,
        "block_eps": result.block_eps,
        "eps_search": [asdict(entry) for entry in result.search],
        "calibration_agreement": result.agreement,
        "warnings": result.warnings,
        "blocks": [asdict(entry) for entry in result.log],
    }
    lines = [f"{'block':>5}  {'tokens':>6}  {'steps':>5}  {'E_(l+1)':>9}  {'seconds':>7}"]
    for entry in sorted(result.log, key=lambda e: e.block):
        unreached = "  (eps not reached)" if entry.reached_eps is False else ""
        lines.append(
            f"{entry.block:>5}  {entry.kept:>6}  {len(entry.errors):>5}  "
            f"{entry.errors[-1]:>9.5f}  {entry.seconds:>7.1f}{unreached}"
        )
    if result.search:
        lines.append(
            f"{describe_eps(result.block_eps)}, found in {len(result.search)} runs for a "
            f"{100 * settings.target_reduction:.0f}% FLOP target"
        )
    elif result.block_eps is not None:
        lines.append(describe_eps(result.block_eps))
    lines.append(
        f"tokens per block (class token included) {list(result.plan.keep_counts)}: "
        f"{dense / 1e9:.4f} -> {result.flops / 1e9:.4f} GFLOPs "
        f"({100 * result.flops_reduction:.1f}% fewer) -> {args.out}"
    )
    lines.append(
        f"agreement with the dense model on the calibration images: "
        f"{100 * result.agreement:.1f}% (before fine-tuning)"
    )
    lines += [f"warning: {message}" for message in result.warnings]
    _report(args, summary, lines)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    init_distributed()
    _check_outputs(
        files=[("--out", args.out)],
        inputs=[("--checkpoint", args.checkpoint), ("--teacher", args.teacher)],
    )
    settings = _settings(args, FinetuneSettings)
    slimmed = _load(args.checkpoint, "--checkpoint", args.num_heads)
    teacher = _load(args.teacher, "--teacher", args.num_heads)
    if teacher.plan is not None:
        raise UsageError("--teacher must be the dense model")
    if teacher.config != slimmed.config:
        raise UsageError("--teacher and --checkpoint have different architectures")
    _check_shift(settings, slimmed)
    data = _dataset(args.data, "train", slimmed, exact=True)
    held_out = _eval_dataset(args, slimmed)
    _start_long_run(args)
    logs = finetune(
        slimmed,
        teacher,
        data,
        settings,
        progress=not args.json,
        on_epoch_end=lambda log: _progress_line(args, log),
    )
    headline = f"fine-tuned {args.checkpoint} for {settings.epochs} epochs -> {args.out}"
    _save_trained(args, slimmed, held_out, logs, headline, settings=settings.to_dict())
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    init_distributed()
    set_threads(args.threads)
    model = _load(args.checkpoint, "--checkpoint", args.num_heads)
    if args.eval_data == DIGITS:
        data = _dataset(DIGITS, args.split, model, "--eval-data", exact=True)
    else:
        data = _dataset(args.eval_data, "test", model, "--eval-data", exact=True)
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
    # Timings are where threads fighting other processes for the cores hurt most: the
    # same check as before a long run (CPU threads also drive the CUDA launches).
    _start_long_run(args)
    if device.type == "cpu" and args.dtype == "bfloat16" and not cpu_has_native_bf16():
        logger.warning(
            "this CPU has no native bfloat16 (AVX512-BF16 or AMX): torch emulates bf16 "
            "GEMMs, several times slower than float32; time --dtype float32 too"
        )
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
        rows = [
            compare(str(args.checkpoint), model, plan, batch=batch, cuda_graphs=graphs, **timing)
            for batch, graphs in timing_jobs(args.batch, args.cuda_graphs)
        ]
    records = [row.to_dict() for row in rows]
    table = markdown_table(TABLE_HEADERS, [table_row(row) for row in rows])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        _write_text(args.out / "bench.json", _json_text(records, indent=2))
        _write_text(args.out / "bench.md", f"{describe_machine(device)}\n\n{table}\n")
    _report(args, {"machine": describe_machine(device), "rows": records}, [table])
    noisy = [row for row in rows if row.noisy]
    if noisy:
        print(
            f"warning: the timings of {len(noisy)} of {len(rows)} rows spread by up to "
            f"{100 * max(row.spread for row in noisy):.0f}% of their median (10th to 90th "
            "percentile): they measure the machine's load more than the models. Rerun on a "
            "quiet machine, with fewer threads (e.g. patchslim bench --threads 1 ...) or "
            f"more --repeats than {args.repeats}",
            file=sys.stderr,
        )
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
    """Write ``path`` atomically, a failure reported as an :class:`OutputError`."""
    try:
        atomic_write(path, lambda partial: partial.write_text(text))
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    _check_outputs(directories=[("--out-dir", args.out_dir)])
    _start_long_run(args)
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
        native_bf16=cpu_has_native_bf16(),
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


def _check_cpu_isa() -> None:
    """A bad ``PATCHSLIM_CPU_ISA`` is reported before any work, not at the first kernel."""
    try:
        cpu_isa()
    except (RuntimeError, ValueError) as error:
        raise UsageError(str(error).strip().splitlines()[0]) from None


class _ConsoleHandler(logging.Handler):
    """The library's log on stderr, ``patchslim: …`` (warnings ``patchslim: warning: …``),
    written through tqdm so that progress bars stay intact."""

    def emit(self, record: logging.LogRecord) -> None:
        if process_group()[0] != 0:
            return
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        tqdm.write(f"patchslim: {kind}{record.getMessage()}", file=sys.stderr)


def _log_to_console() -> None:
    if not any(isinstance(handler, _ConsoleHandler) for handler in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run(args: argparse.Namespace) -> int:
    """Run the command ``args.command`` on the arguments that
    :func:`patchslim_ext.cli.build_parser` parsed; returns the exit code. Expected
    errors are raised as :class:`PatchslimError` (the caller prints them)."""
    _log_to_console()
    _check_cpu_isa()
    # Looked up when called, so that a test can replace a command.
    handler = globals()[f"_cmd_{args.command}"]
    return handler(args)
