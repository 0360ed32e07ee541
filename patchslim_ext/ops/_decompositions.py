"""The reference decompositions of the patchslim ops, in a table of our own.

Each op's reference in standard torch ops is its decomposition, for
``ExportedProgram.run_decompositions`` (:func:`patchslim_ext.ops.decompositions`) and for
``torch.onnx.export(..., dynamo=True)``. They are not left in torch's global
decomposition table (``torch._decomp.decomposition_table``, where
``torch._decomp.register_decomposition`` puts them): inductor checks that table before it
calls an op's kernel, and where the environment variable ``CI`` is set (CI jobs), it
refuses with an AssertionError ("a decomposition exists, we should switch to it") to
compile a graph that calls the kernel of an op with a decomposition, so
``torch.compile`` of a slimmed model failed in CI jobs. The ONNX exporter reads only the
global table, so :func:`registered_decompositions` puts ours there while it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {}


def decomposition(op: torch._ops.OpOverload) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` is ``op``'s decomposition (in :data:`DECOMPOSITIONS`)."""

    def register(fn: Callable) -> Callable:
        DECOMPOSITIONS[op] = fn
        return fn

    return register


@contextlib.contextmanager
def registered_decompositions() -> Iterator[None]:
    """Our decompositions in torch's global table for the duration of the block, for
    ``torch.onnx.export(..., dynamo=True)`` of a model that calls patchslim ops::

        with patchslim_ext.ops.registered_decompositions():
            torch.onnx.export(model, args, dynamo=True, optimize=False)

    (:func:`patchslim_ext.export.export_onnx` does this, and explains ``optimize=False``.)
    Not for ``torch.compile``, which should call the kernels."""
    table = torch._decomp.decomposition_table
    added = [op for op in DECOMPOSITIONS if op not in table]
    table.update({op: DECOMPOSITIONS[op] for op in added})
    try:
        yield
    finally:
        for op in added:
            table.pop(op, None)
