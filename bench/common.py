"""Shared benchmark helpers: timing and result files (machine description and tables
come from patchslim_ext.benchmark)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils import benchmark

# PATCHSLIM_BENCH_RESULTS redirects the result files (scripts/gpu_check.sh collects them
# elsewhere, so that a trial run leaves the committed results alone).
RESULTS = Path(os.environ.get("PATCHSLIM_BENCH_RESULTS") or Path(__file__).parent / "results")


def median_seconds(fn: Callable[[], Any], min_run_time: float) -> float:
    """Median time of ``fn()`` by torch.utils.benchmark (synchronises CUDA itself)."""
    fn()  # warm-up: allocator, MKL/cuBLAS handles
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def save(name: str, records: list[dict[str, Any]], table: str, header: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(records, indent=2))
    path = RESULTS / f"{name}.md"
    path.write_text(f"{header}\n\n{table}\n")
    return path
