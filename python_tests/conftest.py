"""Shared test helpers: device parametrisation and reference tolerances."""

from __future__ import annotations

import pytest
import torch

import patchslim_ext  # noqa: F401  (registers torch.ops.patchslim)

CUDA_SKIP_REASON = "CUDA is not available (no GPU on this machine, or torch built without CUDA)"


def cpu_and_cuda() -> list:
    """Devices to parametrise over; the CUDA case is skipped, with the reason, without a GPU."""
    return [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON),
        ),
    ]


def cpu_isas() -> list[str]:
    """The CPU ISA paths this machine can run, narrowest first."""
    from patchslim_ext import _C

    order = ["scalar", "avx2", "avx512"]
    return order[: order.index(_C.detected_cpu_isa()) + 1]


def randomise_parameters(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Random values in every parameter (biases, norms, embeddings too), not the init:
    N(0, scale²), plus 1 on LayerNorm weights so the norms stay well scaled."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * scale)
            if "norm" in name and name.endswith("weight"):
                param.add_(1.0)
    return module


@pytest.fixture
def cpu_isa_env(monkeypatch):
    """Set PATCHSLIM_CPU_ISA for one test: ``cpu_isa_env("avx2")``."""

    def select(isa: str) -> None:
        monkeypatch.setenv("PATCHSLIM_CPU_ISA", isa)

    return select
