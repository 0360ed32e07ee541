"""Export a dense or slimmed model to ONNX: standard operators, the plan baked in.

``torch.onnx.export(..., dynamo=True)`` traces the model through ``torch.export``; every
patchslim op has its reference in standard torch ops as its decomposition, registered
while the exporter runs (:func:`patchslim_ext.ops.registered_decompositions`), so the
file holds only standard ONNX operators and runs without our compiled library (ONNX
Runtime, TensorRT). The plan is static: the token permutation is one Gather, and each
block updates a prefix of the tokens through slices and a concatenation.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from patchslim_ext.files import atomic_write
from patchslim_ext.ops import registered_decompositions
from patchslim_ext.pruning import PrunableViT
from patchslim_ext.settings import ONNX_DTYPE_NAMES

ONNX_DTYPES = {name: getattr(torch, name) for name in ONNX_DTYPE_NAMES}


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` (dense, or with its plan set) to ``path`` as an ONNX file.

    Args:
        model: our :class:`~patchslim_ext.vit.VisionTransformer` or a prunable timm model;
            it is copied, not changed.
        batch_size: the graph's batch (ignored with ``dynamic_batch``).
        dynamic_batch: make the batch dimension symbolic.
        dtype: the weights' and the input's dtype in the file.

    The graph takes ``images`` (B, in_chans, H, W) and returns ``logits`` (B, classes).
    The file is written atomically (:func:`~patchslim_ext.files.atomic_write`).
    """
    if not isinstance(model, PrunableViT):
        raise TypeError(
            f"export_onnx takes a VisionTransformer or a prunable timm model, got "
            f"{type(model).__name__}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = model.config
    device = next(model.parameters()).device
    model = copy.deepcopy(model).eval().to(dtype)
    # torch.export specialises a dimension of size 1, so a dynamic batch is traced at 2.
    example_batch = max(batch_size, 2) if dynamic_batch else batch_size
    images = torch.randn(
        example_batch, config.in_chans, config.img_size, config.img_size, dtype=dtype, device=device
    )
    dynamic_shapes = {"images": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    # With autograd on, the slimmed blocks concatenate kept and passed-through rows
    # instead of writing into a buffer in place, which ONNX would express as a scatter.
    with torch.enable_grad(), _without_pytree_warnings(), registered_decompositions():
        program = torch.onnx.export(
            model,
            (images,),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=["images"],
            output_names=["logits"],
            verbose=False,
            # onnxscript's optimiser (0.7) rewrites `x + c` to `x` for any |c| <= 1e-8:
            # it dropped the epsilon of T2T-ViT's performer normaliser, whose 0/0 then
            # gave NaN logits in ONNX Runtime. Runtimes fold and fuse the graph anyway.
            optimize=False,
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda partial: program.save(str(partial)))


@contextlib.contextmanager
def _without_pytree_warnings() -> Iterator[None]:
    """Silence torch.export's warnings about its own deprecated pytree API, for a while."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield
