"""Dense vs slimmed DeiT-Ti/S/B, the paper's Table 2: the same harness as
``patchslim bench`` (patchslim_ext.benchmark), with results saved under bench/results.

Plans match the paper's FLOP reductions (46.2%, 43.6%, 44.3%) with a pyramid shape;
weights are random (timing does not depend on them).

    python bench/bench_models.py                       # CPU fp32, batch 32 and 1
    python bench/bench_models.py --device cuda --dtype bfloat16 --batch 256 1024 1 \
        --cuda-graphs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save

from patchslim_ext.benchmark import (
    PAPER_FLOP_REDUCTION,
    TABLE_HEADERS,
    describe_machine,
    markdown_table,
    run_benchmarks,
    table_row,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--models", nargs="+", default=sorted(PAPER_FLOP_REDUCTION))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cuda-graphs", action="store_true")
    args = parser.parse_args()
    rows = run_benchmarks(
        args.models,
        batches=args.batch,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        repeats=args.repeats,
        cuda_graphs=args.cuda_graphs,
    )
    table = markdown_table(TABLE_HEADERS, [table_row(row) for row in rows])
    header = (
        f"Dense vs slimmed, {args.device} {args.dtype}, median of {args.repeats} runs, "
        f"on {describe_machine(args.device)}; random weights"
    )
    path = save(f"models_{args.device}_{args.dtype}", [r.to_dict() for r in rows], table, header)
    print(f"\n{header}\n\n{table}\n\nsaved {path} and .json")


if __name__ == "__main__":
    main()
