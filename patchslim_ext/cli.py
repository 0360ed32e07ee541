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
from patchslim_ext.runtime import (
    init_distributed,
    oversubscription_warning,
    process_group,
    set_threads,
)
from patchslim_ext.settings import (
    FinetuneSettings,
    SlimSettings,
    TrainSettings,
    check_value,
    value_type,
)
from patchslim_ext.slimming import describe_eps, slim
from patchslim_ext.training import EpochLog, evaluate, finetune, train
from patchslim_ext.vit import MODEL_FACTORIES, VisionTransformer

DEFAULT_MODEL = "digits_vit"
logger = logging.getLogger("patchslim")
# Options whose names predate the settings dataclasses' field names.
_OPTION_NAMES = {"max_shift": "--shift", "num_workers": "--workers"}
# Architecture options of `train`: ViTConfig fields a named architecture can change.
_ARCHITECTURE_OPTIONS = ("img_size", "in_chans", "patch_size", "embed_dim", "depth")
# Dense baselines of the paper's Table 1, which prints them rounded to 0.1 GFLOPs.
PAPER_GFLOPS = {
    "deit_tiny_patch16_224": 1.3,
    "deit_small_patch16_224": 4.6,
    "deit_base_patch16_224": 17.6,
    "t2t_vit_14": 5.2,
}


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
    """The digits or an image folder, read at the model's image size and channels; the
    folder's classes are checked against the model's head: ``exact`` (labels are used)
    refuses a different count, otherwise a difference is a warning."""
    config = model.config
    try:
        data = load_dataset(source, split, config.img_size, config.in_chans)
    except (OSError, PatchslimError) as error:
        raise UsageError(f"{option} {source}: {error}") from None
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
    """``save_model`` (a temporary file renamed over ``path``), leaving nothing behind
    when it fails."""
    try:
        save_model(model, path)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error}") from None
    finally:
        path.with_name(path.name + ".partial").unlink(missing_ok=True)


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
    if num_classes is None and args.data != DIGITS:
        root = Path(args.data)
        if root.is_dir():
            num_classes = sum(1 for entry in root.iterdir() if entry.is_dir())
    if num_classes is not None:
        if num_classes < 2:
            raise UsageError(
                f"--data {args.data}: {num_classes} class folder(s); a classifier needs at least "
                "2 (<root>/<class>/<image>)"
            )
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
    if settings.calib_size is not None and settings.calib_size > len(calib):
        raise UsageError(
            f"--calib-size {settings.calib_size}: the calibration data {args.data} holds only "
            f"{len(calib)} images"
        )
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
    noisy = [row for row in rows if row.noisy]
    if noisy:
        print(
            f"warning: the timings of {len(noisy)} of {len(rows)} rows spread by up to "
            f"{100 * max(row.spread for row in noisy):.0f}% of their median (10th to 90th "
            "percentile): they measure the machine's load more than the models. Rerun on a "
            "quiet machine, with fewer threads (e.g. OMP_NUM_THREADS=1 patchslim bench ...) or "
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
    train_cmd.set_defaults(handler=_cmd_train)

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
    finetune_cmd.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    _add_settings(finetune_cmd, FinetuneSettings)
    _add_common(finetune_cmd, threads=True, seed=False)
    finetune_cmd.set_defaults(handler=_cmd_finetune)

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
            choices=sorted(MODEL_FACTORIES),
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
            choices=sorted(MODEL_FACTORIES),
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; an expected error (:class:`PatchslimError`: bad arguments or
    input, outputs that cannot be written, a diverging run) ends in one line on stderr
    and exit code 2. Anything else is a bug and keeps its traceback."""
    _log_to_console()
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
