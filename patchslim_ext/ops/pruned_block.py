"""Fake kernels, autograd and Python entry points of the pruned-block ops.

Besides their results, the forward ops return the activations their backward reads
(Q, the K|V projection and the attention context; FC1's pre-activation), as
``native_layer_norm`` returns its statistics; the Python entry points hide them.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MSA_PARAMS = ("ln_weight", "ln_bias", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias")
_MLP_PARAMS = ("ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def _check_x(x: Tensor, n_keep: int, num_heads: int) -> None:
    torch._check(x.dim() == 3, lambda: f"x must have shape (B, N, C), got {tuple(x.shape)}")
    torch._check(1 <= n_keep <= x.shape[1], lambda: f"n_keep must be in [1, {x.shape[1]}]")
    torch._check(x.shape[2] % num_heads == 0, lambda: "C must be divisible by num_heads")


@torch.library.register_fake("patchslim::pruned_msa")
def _pruned_msa_fake(x, n_keep, num_heads, *params_and_eps):
    _check_x(x, n_keep, num_heads)
    batch, tokens, channels = x.shape
    return (
        x.new_empty(batch, n_keep, channels),
        x.new_empty(batch, num_heads, n_keep, tokens),
        x.new_empty(batch, n_keep, channels),
        x.new_empty(batch, tokens, 2 * channels),
        x.new_empty(batch, n_keep, channels),
    )


@torch.library.register_fake("patchslim::pruned_msa_")
def _pruned_msa_inplace_fake(x, n_keep, num_heads, *params_and_eps):
    _check_x(x, n_keep, num_heads)


@torch.library.register_fake("patchslim::pruned_msa_backward")
def _pruned_msa_backward_fake(grad_out, grad_attn, x, n_keep, num_heads, *rest):
    params = rest[: len(_MSA_PARAMS)]
    return (torch.empty_like(x), *(torch.empty_like(p) for p in params))


@torch.library.register_fake("patchslim::pruned_mlp")
def _pruned_mlp_fake(x, ln_weight, ln_bias, fc1_weight, *rest):
    torch._check(x.dim() == 3, lambda: f"x must have shape (B, n, C), got {tuple(x.shape)}")
    batch, kept, _ = x.shape
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(batch, kept, fc1_weight.shape[0]),
    )


@torch.library.register_fake("patchslim::pruned_mlp_")
def _pruned_mlp_inplace_fake(x, *params_and_eps):
    torch._check(x.dim() == 3, lambda: f"x must have shape (B, n, C), got {tuple(x.shape)}")


@torch.library.register_fake("patchslim::pruned_mlp_backward")
def _pruned_mlp_backward_fake(grad_out, x, *rest):
    params = rest[: len(_MLP_PARAMS)]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        *(torch.empty_like(p) for p in params),
    )


def _msa_setup_context(ctx, inputs, output) -> None:
    x, n_keep, num_heads, *params, eps = inputs
    _out, attn, q, kv, context = output
    ctx.save_for_backward(x, *params, attn, q, kv, context)
    ctx.n_keep, ctx.num_heads, ctx.eps = n_keep, num_heads, eps


def _msa_backward(ctx, grad_out: Tensor, grad_attn: Tensor | None, *_saved_grads):
    x, *params, attn, q, kv, context = ctx.saved_tensors
    grad_x, *param_grads = torch.ops.patchslim.pruned_msa_backward(
        grad_out, grad_attn, x, ctx.n_keep, ctx.num_heads, *params, ctx.eps, attn, q, kv, context
    )
    return grad_x, None, None, *param_grads, None


def _mlp_setup_context(ctx, inputs, output) -> None:
    x, *params, eps = inputs
    ctx.save_for_backward(x, *params, output[1])
    ctx.eps = eps


def _mlp_backward(ctx, grad_out: Tensor, _grad_pre: Tensor | None):
    x, *params, pre = ctx.saved_tensors
    grad_x, *param_grads = torch.ops.patchslim.pruned_mlp_backward(
        grad_out, x, *params, ctx.eps, pre
    )
    return grad_x, *param_grads, None


torch.library.register_autograd(
    "patchslim::pruned_msa", _msa_backward, setup_context=_msa_setup_context
)
torch.library.register_autograd(
    "patchslim::pruned_mlp", _mlp_backward, setup_context=_mlp_setup_context
)


def pruned_msa(
    x: Tensor,
    n_keep: int,
    num_heads: int,
    ln_weight: Tensor,
    ln_bias: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """The attention sub-layer of a pruned block.

    Args:
        x: (B, N, C) block input; rows [0, n_keep) are the kept tokens.
        qkv_weight, qkv_bias: (3C, C), (3C,) in timm's [q; k; v] layout.
        proj_weight, proj_bias: (C, C), (C,).

    Returns:
        ``x[:, :n_keep] + Proj(Attn(LN1(x)[:, :n_keep], LN1(x), LN1(x)))``, (B, n_keep, C),
        and the attention probabilities, (B, H, n_keep, N).
    """
    out, attn, *_saved = torch.ops.patchslim.pruned_msa(
        x,
        n_keep,
        num_heads,
        ln_weight,
        ln_bias,
        qkv_weight,
        qkv_bias,
        proj_weight,
        proj_bias,
        eps,
    )
    return out, attn


def pruned_mlp(
    x: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    eps: float = 1e-6,
) -> Tensor:
    """The MLP sub-layer on the kept rows: (B, n, C) -> ``x + FC2(GELU(FC1(LN2(x))))``."""
    out, _pre = torch.ops.patchslim.pruned_mlp(
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps
    )
    return out
