"""Where the time of a dense and a slimmed model goes, kernel by kernel, side by side.

torch.profiler over a few forwards of each (random weights, the paper's plan, as in
``patchslim bench``); the rows are the profiler's events grouped by name: on CUDA the
GPU kernels by device time, on the CPU the operators by self time. A row present in
one model only shows as 0 in the other. Saved as ``bench/results/profile_<model>_
<device>_<dtype>_b<batch>.{json,md}``.

    python bench/profile_models.py --models deit_tiny_patch16_224 --batch 1
    python bench/profile_models.py --device cuda --dtype bfloat16 --batch 256
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import save

from patchslim_ext.benchmark import (
    check_paper_models,
    describe_machine,
    markdown_table,
    paper_model,
    random_batches,
)


def event_times_us(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, calls: int
) -> dict[str, float]:
    """Microseconds per forward by event name: device time of GPU kernels on CUDA, CPU
    self time of operators on the CPU."""
    cuda = images.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        for _ in range(3):
            forward(images)
        if cuda:
            torch.cuda.synchronize(images.device)
        with profile(activities=activities) as prof:
            for _ in range(calls):
                forward(images)
            if cuda:
                torch.cuda.synchronize(images.device)
    times: dict[str, float] = {}
    for event in prof.key_averages():
        # Device events (kernels, copies) carry device time; on the CPU, operators
        # carry self time. Operators are skipped on CUDA: their kernels are counted.
        if cuda:
            spent = event.self_device_time_total if event.device_type.name == "CUDA" else 0.0
        else:
            spent = event.self_cpu_time_total
        if spent > 0:
            times[event.key] = spent / calls
    return times


def profile_rows(
    name: str, *, device: str, dtype: torch.dtype, batch: int, calls: int, top: int
) -> tuple[list[dict[str, object]], float, float]:
    """The ``top`` events by the larger of the two models' times, and each model's
    total (µs per forward)."""
    dense, plan = paper_model(name)
    dense = dense.to(device, dtype)
    slimmed = copy.deepcopy(dense).set_plan(plan)
    images = random_batches(dense.config, batch, 1, device=device, dtype=dtype)[0]
    dense_us = event_times_us(dense, images, calls)
    slim_us = event_times_us(slimmed, images, calls)
    names = sorted(
        set(dense_us) | set(slim_us),
        key=lambda key: -max(dense_us.get(key, 0.0), slim_us.get(key, 0.0)),
    )
    rows = [
        {"event": key, "dense_us": dense_us.get(key, 0.0), "slim_us": slim_us.get(key, 0.0)}
        for key in names[:top]
    ]
    return rows, sum(dense_us.values()), sum(slim_us.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_base_patch16_224"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=10, help="profiled forwards per model")
    parser.add_argument("--top", type=int, default=25, help="events shown per model")
    args = parser.parse_args()
    try:
        check_paper_models(args.models)
    except ValueError as error:
        parser.error(str(error))
    dtype = getattr(torch, args.dtype)
    what = (
        "GPU kernels, device time" if args.device.startswith("cuda") else "operators, CPU self time"
    )
    for name in args.models:
        rows, dense_total, slim_total = profile_rows(
            name, device=args.device, dtype=dtype, batch=args.batch, calls=args.calls, top=args.top
        )
        table = markdown_table(
            ("event", "dense µs", "slim µs", "slim − dense µs"),
            [
                [
                    f"`{row['event'][:90]}`",
                    f"{row['dense_us']:.1f}",
                    f"{row['slim_us']:.1f}",
                    f"{row['slim_us'] - row['dense_us']:+.1f}",
                ]
                for row in rows
            ]
            + [
                [
                    "all events",
                    f"{dense_total:.1f}",
                    f"{slim_total:.1f}",
                    f"{slim_total - dense_total:+.1f}",
                ]
            ],
        )
        header = (
            f"Profile of {name}, dense vs slimmed at the paper's FLOP reduction, "
            f"{args.device} {args.dtype}, batch {args.batch}, µs per forward ({what}; mean "
            f"of {args.calls} forwards), on {describe_machine(args.device)}; random weights"
        )
        stem = f"profile_{name}_{args.device.split(':')[0]}_{args.dtype}_b{args.batch}"
        path = save(stem, rows, table, header)
        print(f"\n{header}\n\n{table}\n\nsaved {path} and .json")


if __name__ == "__main__":
    main()
