"""Shared test helpers: device parametrisation and reference tolerances."""

from __future__ import annotations

import pytest
import torch

import patchslim_ext.ops  # noqa: F401  (registers torch.ops.patchslim)


def _define_torchvision_schemas_if_unloadable() -> None:
    """Let ``import timm`` (hence ``import torchvision``) work on a CPU-only torch.

    The package registry's torchvision is built against CUDA torch: on our CPU torch its
    compiled library does not load, so the operator schemas it would define are missing,
    and torchvision's import stops at its fake-kernel registrations for
    ``torchvision::nms`` and ``torchvision::qnms``. Defining those two schemas (as the
    library would) lets the pure-Python rest import; no test calls them. Where the
    library loads (a matching torch), nothing is defined here.
    """
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    library = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    try:
        if library is not None:
            torch.ops.load_library(str(library))
            return
    except OSError:
        pass
    for name in ("nms", "qnms"):
        torch.library.define(
            f"torchvision::{name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
        )


_define_torchvision_schemas_if_unloadable()

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

    order = ["scalar", "avx2", "avx512", "avx512_bf16"]
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
