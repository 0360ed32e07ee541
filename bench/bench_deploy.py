"""Dense vs slimmed, in every engine a user would deploy with on a CPU: eager fp32, eager
bf16 (the model cast), torch.compile (bf16), torch.compile with inductor's freezing
(bf16; the weights folded in as constants and prepacked for oneDNN, as PyTorch's CPU
inference guides advise) and ONNX Runtime (fp32, from our export); on a CPU without
native bf16, the two torch.compile engines in fp32 instead of the three bf16 ones.

One run times every cell side by side: DeiT-Ti/S/B and T2T-ViT-14 at 224×224 with the
paper's FLOP reductions (pyramid plans, random weights), batch 32 and 1. Each cell is
the median of ``--repeats`` timed calls (after warm-up) rotating over three batches; the
spread (10th–90th percentile) is reported, and a cell whose spread exceeds 20% of its
median is flagged. Dense and slimmed calls alternate, so that load changes on the
machine fall on both alike, and a cell's time reduction is the median over adjacent
(dense, slimmed) pairs of 1 − slimmed/dense. Results go to bench/results/deploy_cpu.{json,md}.

    python bench/bench_deploy.py
    python bench/bench_deploy.py --models deit_small_patch16_224 --batch 32 --repeats 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from common import save

from patchslim_ext.benchmark import (
    PAPER_FLOP_REDUCTION,
    cpu_has_native_bf16,
    describe_machine,
    markdown_table,
    paper_model,
)
from patchslim_ext.export import export_onnx
from patchslim_ext.flops import flops_of

# Each engine and the dtype of the model and the images it takes.
ENGINES = {
    "eager fp32": torch.float32,
    "eager bf16": torch.bfloat16,
    "compile fp32": torch.float32,
    "compile bf16": torch.bfloat16,
    "frozen compile fp32": torch.float32,
    "frozen compile bf16": torch.bfloat16,
    "onnxruntime fp32": torch.float32,
}


def default_engines() -> list[str]:
    """What a user would deploy with on this CPU: bf16 where the CPU has it natively;
    elsewhere torch emulates bf16 GEMMs, several times slower than float32, and
    torch.compile runs in float32."""
    if cpu_has_native_bf16():
        return [
            "eager fp32",
            "eager bf16",
            "compile bf16",
            "frozen compile bf16",
            "onnxruntime fp32",
        ]
    return ["eager fp32", "compile fp32", "frozen compile fp32", "onnxruntime fp32"]


NOISY_SPREAD = 0.2


def _timings(
    forwards: dict[str, Callable[[Tensor], object]], batches: list[Tensor], repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each forward, the forwards' calls interleaved, so that a change
    in the machine's load (a shared 2-core VM) falls on every variant alike."""
    times = {variant: [] for variant in forwards}
    with torch.no_grad():
        for forward in forwards.values():  # warm-up (and, for torch.compile, compilation)
            for batch in batches:
                forward(batch)
        for index in range(repeats):
            for variant, forward in forwards.items():
                start = time.perf_counter()
                forward(batches[index % len(batches)])
                times[variant].append(time.perf_counter() - start)
    return times


def _onnx_forward(model: nn.Module, batch: int, workdir: Path) -> Callable[[Tensor], object]:
    import onnxruntime

    path = export_onnx(model, workdir / f"model_{id(model)}_{batch}.onnx", batch_size=batch)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images.numpy()})


def _forward(
    engine: str, model: nn.Module, batch: int, workdir: Path
) -> Callable[[Tensor], object]:
    if engine == "onnxruntime fp32":
        return _onnx_forward(model, batch, workdir)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {list(ENGINES)}")
    dtype = ENGINES[engine]
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    if engine.startswith("frozen"):
        return torch.compile(model, options={"freezing": True})
    return torch.compile(model) if engine.startswith("compile") else model


def _cell(times: list[float]) -> dict:
    median = statistics.median(times)
    deciles = statistics.quantiles(times, n=10) if len(times) > 1 else [median] * 9
    return {
        "ms": 1e3 * median,
        "p10_ms": 1e3 * deciles[0],
        "p90_ms": 1e3 * deciles[-1],
        "noisy": (deciles[-1] - deciles[0]) > NOISY_SPREAD * median,
    }


def run(models: list[str], batches: list[int], engines: list[str], repeats: dict) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            dense, plan = paper_model(name)
            slimmed = copy.deepcopy(dense).set_plan(plan)
            config = dense.config
            reduction = 1 - flops_of(config, plan.keep_counts) / flops_of(config)
            for batch in batches:
                generator = torch.Generator().manual_seed(batch)
                images = [
                    torch.randn(batch, 3, config.img_size, config.img_size, generator=generator)
                    for _ in range(3)
                ]
                for engine in engines:
                    row = {"model": name, "batch": batch, "engine": engine}
                    row["flop_reduction"] = reduction
                    print(f"{name} batch {batch} {engine}", file=sys.stderr)
                    if "compile" in engine:
                        # Every model and batch compiles the same forward code; past
                        # dynamo's recompile limit (8) it would run eager without a word.
                        torch._dynamo.reset()
                    forwards = {
                        variant: _forward(engine, model, batch, Path(workdir))
                        for variant, model in (("dense", dense), ("slim", slimmed))
                    }
                    inputs = [x.to(ENGINES[engine]) for x in images]
                    times = _timings(forwards, inputs, repeats[batch])
                    for variant, seconds in times.items():
                        row.update(
                            {f"{variant}_{key}": value for key, value in _cell(seconds).items()}
                        )
                    # Of adjacent dense and slimmed calls, so that drifts in the machine's
                    # speed cancel (the medians above may come from different moments).
                    paired = [s / d for s, d in zip(times["slim"], times["dense"], strict=True)]
                    row["time_reduction"] = 1 - statistics.median(paired)
                    row["ratio"] = row["time_reduction"] / reduction
                    rows.append(row)
    return rows


def summary(rows: list[dict]) -> list[list[str]]:
    """Per model and batch: the fastest dense and the fastest slimmed engine."""
    lines = []
    for key in sorted({(row["model"], row["batch"]) for row in rows}):
        group = [row for row in rows if (row["model"], row["batch"]) == key]
        best_dense = min(group, key=lambda row: row["dense_ms"])
        best_slim = min(group, key=lambda row: row["slim_ms"])
        gain = 1 - best_slim["slim_ms"] / best_dense["dense_ms"]
        lines.append(
            [
                key[0],
                str(key[1]),
                f"{best_dense['engine']} {best_dense['dense_ms']:.1f}",
                f"{best_slim['engine']} {best_slim['slim_ms']:.1f}",
                f"{100 * gain:.1f}%",
                f"{100 * best_slim['flop_reduction']:.1f}%",
                f"{gain / best_slim['flop_reduction']:.2f}",
            ]
        )
    return lines


def _ms(row: dict, variant: str) -> str:
    flag = " (noisy)" if row[f"{variant}_noisy"] else ""
    low, high = row[f"{variant}_p10_ms"], row[f"{variant}_p90_ms"]
    return f"{row[f'{variant}_ms']:.1f} [{low:.1f}–{high:.1f}]{flag}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(PAPER_FLOP_REDUCTION))
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 1])
    parser.add_argument(
        "--engines",
        nargs="+",
        default=default_engines(),
        choices=list(ENGINES),
        help="default: those a user would pick on this CPU (bf16 only where it is native)",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed calls at batch > 1")
    parser.add_argument("--repeats-batch-1", type=int, default=30, help="timed calls at batch 1")
    parser.add_argument("--name", default="deploy_cpu", help="results file name")
    args = parser.parse_args()
    repeats = {batch: args.repeats_batch_1 if batch == 1 else args.repeats for batch in args.batch}
    rows = run(args.models, args.batch, args.engines, repeats)
    table = markdown_table(
        ("model", "batch", "engine", "FLOPs ↓", "dense ms [p10–p90]", "slim ms [p10–p90]",
         "time ↓", "ratio"),
        [
            [row["model"], str(row["batch"]), row["engine"], f"{100 * row['flop_reduction']:.1f}%",
             _ms(row, "dense"), _ms(row, "slim"), f"{100 * row['time_reduction']:.1f}%",
             f"{row['ratio']:.2f}"]
            for row in rows
        ],
    )  # fmt: skip
    best = markdown_table(
        ("model", "batch", "fastest dense (ms)", "fastest slim (ms)", "time ↓", "FLOPs ↓",
         "ratio"),
        summary(rows),
    )  # fmt: skip
    header = (
        f"Deployment engines, dense vs slimmed, CPU, medians of {args.repeats} (batch > 1) / "
        f"{args.repeats_batch_1} (batch 1) calls, on {describe_machine('cpu')}; random weights"
    )
    path = save(args.name, rows, f"{table}\n\nFastest engine each:\n\n{best}", header)
    print(f"\n{header}\n\n{table}\n\n{best}\n\nsaved {path} and .json")


if __name__ == "__main__":
    main()
