"""Shared benchmark helpers: machine description, timing, result files."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark

from patchslim_ext import _C
from patchslim_ext.ops import cpu_isa

RESULTS = Path(__file__).parent / "results"


def machine(device: str) -> str:
    """One line naming where the numbers came from."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{cpu_isa()} kernels ({_C.detected_cpu_isa()} detected), torch {torch.__version__}"
    )


def median_seconds(fn: Callable[[], Any], min_run_time: float) -> float:
    """Median time of ``fn()`` by torch.utils.benchmark (synchronises CUDA itself)."""
    fn()  # warm-up: allocator, MKL/cuBLAS handles
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, records: list[dict[str, Any]], table: str, header: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(records, indent=2))
    path = RESULTS / f"{name}.md"
    path.write_text(f"{header}\n\n{table}\n")
    return path
