"""Fake kernels, autograd, references (registered as decompositions) and the Python entry
point of ``patchslim::prefix_layer_norm``."""

import torch
import torch.nn.functional as F
from torch import Tensor

from patchslim_ext.ops._decompositions import decomposition

_OP = "patchslim::prefix_layer_norm"
_BACKWARD_OP = "patchslim::prefix_layer_norm_backward"


def _stats_dtype(input: Tensor) -> torch.dtype:
    # Statistics are in the kernels' accumulation dtype: float32 on CUDA and for
    # bfloat16/float16 inputs on CPU.
    low_precision = input.dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if input.device.type == "cuda" or low_precision else input.dtype


@torch.library.register_fake(_OP)
def _prefix_layer_norm_fake(input: Tensor, n_rows: int, weight: Tensor, bias: Tensor, eps: float):
    torch._check(input.dim() == 3, lambda: f"input must have shape (B, N, C), got {input.shape}")
    batch, tokens, channels = input.shape
    torch._check(0 <= n_rows <= tokens, lambda: f"n_rows must be in [0, N={tokens}], got {n_rows}")
    torch._check(weight.shape == (channels,), lambda: f"weight must have shape ({channels},)")
    torch._check(bias.shape == (channels,), lambda: f"bias must have shape ({channels},)")
    out = input.new_empty(batch, n_rows, channels)
    stats = input.new_empty(batch, n_rows, dtype=_stats_dtype(input))
    return out, stats, torch.empty_like(stats)


@torch.library.register_fake(_BACKWARD_OP)
def _prefix_layer_norm_backward_fake(
    grad_out: Tensor, input: Tensor, n_rows: int, mean: Tensor, rstd: Tensor, weight: Tensor
):
    torch._check(input.dim() == 3, lambda: f"input must have shape (B, N, C), got {input.shape}")
    channels = input.shape[2]
    return (
        input.new_empty(input.shape),
        weight.new_empty(channels),
        weight.new_empty(channels),
    )


def _setup_context(ctx, inputs, output) -> None:
    input, n_rows, weight, _bias, _eps = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(input, mean, rstd, weight)
    ctx.n_rows = n_rows


def _backward(ctx, grad_out: Tensor, _grad_mean: Tensor, _grad_rstd: Tensor):
    input, mean, rstd, weight = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = torch.ops.patchslim.prefix_layer_norm_backward(
        grad_out.contiguous(), input, ctx.n_rows, mean, rstd, weight
    )
    return (
        grad_input if ctx.needs_input_grad[0] else None,
        None,
        grad_weight if ctx.needs_input_grad[2] else None,
        grad_bias if ctx.needs_input_grad[3] else None,
        None,
    )


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def _prefix_layer_norm_reference(
    input: Tensor, n_rows: int, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``patchslim::prefix_layer_norm`` in standard torch ops, all three outputs."""
    rows = input[:, :n_rows]
    # Written out rather than var_mean, which warns on the empty case (n_rows = 0).
    mean = rows.to(_stats_dtype(input)).mean(-1)
    var = (rows.to(mean.dtype) - mean[..., None]).square().mean(-1)
    out = F.layer_norm(rows, (input.shape[-1],), weight, bias, eps)
    return out, mean, torch.rsqrt(var + eps)


def _prefix_layer_norm_backward_reference(
    grad_out: Tensor, input: Tensor, n_rows: int, mean: Tensor, rstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``patchslim::prefix_layer_norm_backward`` in standard torch ops, from the saved
    statistics (the op takes no eps: it is in ``rstd``)."""
    grad = grad_out.to(mean.dtype)
    xhat = (input[:, :n_rows].to(mean.dtype) - mean[..., None]) * rstd[..., None]
    gw = grad * weight.to(mean.dtype)
    grad_rows = rstd[..., None] * (
        gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True)
    )
    grad_input = F.pad(grad_rows, (0, 0, 0, input.shape[1] - n_rows)).to(input.dtype)
    return (
        grad_input,
        (grad * xhat).sum((0, 1)).to(weight.dtype),
        grad.sum((0, 1)).to(weight.dtype),
    )


decomposition(torch.ops.patchslim.prefix_layer_norm.default)(_prefix_layer_norm_reference)
decomposition(torch.ops.patchslim.prefix_layer_norm_backward.default)(
    _prefix_layer_norm_backward_reference
)


def prefix_layer_norm(
    input: Tensor, n_rows: int, weight: Tensor, bias: Tensor, eps: float = 1e-6
) -> Tensor:
    """LayerNorm over the first ``n_rows`` tokens of every image.

    Equals ``F.layer_norm(input[:, :n_rows], (C,), weight, bias, eps)`` without
    copying the slice.

    Args:
        input: (B, N, C) tokens.
        n_rows: how many leading tokens to normalise, ``0 <= n_rows <= N``.
        weight, bias: (C,) affine parameters.
        eps: added to the variance.

    Returns:
        (B, n_rows, C), contiguous.
    """
    out, _mean, _rstd = torch.ops.patchslim.prefix_layer_norm(input, n_rows, weight, bias, eps)
    return out
