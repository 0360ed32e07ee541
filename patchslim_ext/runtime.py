"""Where the work runs: the ``torchrun`` process group and the CPU threads.

Training, fine-tuning, slimming and evaluation run in one process or under ``torchrun``
(gloo on CPU, nccl on CUDA); :func:`init_distributed` joins the group that
``torchrun`` describes and :func:`process_group` tells every caller where it stands.

On a shared machine OpenMP threads spin-wait against other processes, and a run with
two threads can be ten times slower than with one (docs/design.md §9):
:func:`oversubscription` measures it before a long run.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import Tensor

from patchslim_ext.errors import UsageError


def process_group() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside ``torchrun``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str | torch.device = "cpu") -> bool:
    """Join the process group ``torchrun`` describes, for work on ``device``: gloo for
    the CPU, nccl for CUDA (each process then takes GPU ``LOCAL_RANK``). The backend
    follows where the tensors are, not what the machine has: on a GPU machine a model
    kept on the CPU needs gloo, which nccl cannot stand in for.

    Returns False (and does nothing) when not started by ``torchrun``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum of ``values`` over all processes (``values`` itself outside ``torchrun``)."""
    if process_group()[1] > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads for torch's kernels and ours (None: leave torch's
    choice); returns the number in use."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _probe_seconds(matrix: Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(matrix, matrix)
        best = min(best, time.perf_counter() - start)
    return best


def oversubscription(repeats: int = 5) -> float | None:
    """How many times slower the current thread count runs a test GEMM than one thread
    does (below 1 when threads help; far above 1 when they wait for cores that other
    processes hold); None with one thread. Takes about 10 ms on an idle machine."""
    threads = torch.get_num_threads()
    if threads == 1:
        return None
    matrix = torch.randn(256, 256)
    torch.mm(matrix, matrix)  # warm-up: thread pool start, page faults
    many = _probe_seconds(matrix, repeats)
    torch.set_num_threads(1)
    try:
        one = _probe_seconds(matrix, repeats)
    finally:
        torch.set_num_threads(threads)
    return many / one


# Threads that make a GEMM this much slower than one thread does are fighting for cores.
OVERSUBSCRIBED = 2.0


def oversubscription_warning() -> str | None:
    """A warning with the measured slowdown and what to do, or None when the threads
    do not slow the work down (or one thread is used)."""
    slowdown = oversubscription()
    if slowdown is None or slowdown < OVERSUBSCRIBED:
        return None
    return (
        f"the machine looks oversubscribed: {torch.get_num_threads()} threads ran a test "
        f"GEMM {slowdown:.1f}x slower than 1 thread (other processes hold the cores and "
        "idle OpenMP threads spin); rerun with --threads 1 (or OMP_NUM_THREADS=1), or on a "
        "quieter machine"
    )
