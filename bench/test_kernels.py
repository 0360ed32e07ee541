"""Kernel benchmarks under pytest-benchmark: one pruned block (ours vs the same maths
from plain torch ops) in float32 and bfloat16, and one Eq. 13 scoring chain, over a grid
of shapes.

    pytest bench/test_kernels.py --benchmark-only --benchmark-group-by=param:shape
"""

from __future__ import annotations

import pytest
import torch

from patchslim_ext.ops.pruned_block import (
    _pruned_mlp_inplace_reference,
    _pruned_msa_inplace_reference,
)
from patchslim_ext.pruning import mlp_arguments, msa_arguments, pruned_block_
from patchslim_ext.scoring import chain_diagonal
from patchslim_ext.vit import Block, ViTConfig

pytest.importorskip("pytest_benchmark")

WIDTHS = {"DeiT-Ti": (192, 3), "DeiT-S": (384, 6)}
SHAPES = [(model, batch, kept) for model in WIDTHS for batch in (1, 16) for kept in (197, 98, 1)]


@pytest.mark.parametrize("implementation", ["patchslim", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-b{s[1]}-n{s[2]}")
def test_pruned_block(benchmark, shape, dtype, implementation):
    model, batch, kept = shape
    channels, heads = WIDTHS[model]
    torch.manual_seed(0)
    block = Block(ViTConfig(embed_dim=channels, num_heads=heads)).eval().to(dtype)
    x = torch.randn(batch, 197, channels, dtype=dtype)

    def torch_block(x):
        _pruned_msa_inplace_reference(x, kept, heads, *msa_arguments(block))
        _pruned_mlp_inplace_reference(x[:, :kept], *mlp_arguments(block))

    # Both update a copy of x in place (the copy is timed for both).
    update = (
        (lambda x: pruned_block_(block, x, kept)) if implementation == "patchslim" else torch_block
    )
    run = lambda: update(x.clone())  # noqa: E731
    with torch.no_grad():
        benchmark(run)


@pytest.mark.parametrize("batch", [1, 16])
def test_score_chain(benchmark, batch):
    torch.manual_seed(0)
    counts = [197, 148, 98, 49, 1]
    maps = [torch.softmax(torch.randn(batch, 6, n, 197), -1) for n in counts]
    benchmark(chain_diagonal, maps)
