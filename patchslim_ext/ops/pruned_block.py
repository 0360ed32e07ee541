"""Fake kernels, autograd, references and Python entry points of the pruned-block ops.

Besides their results, the forward ops return the activations their backward reads
(Q, the K|V projection and the attention context; FC1's pre-activation), as
``native_layer_norm`` returns its statistics; the Python entry points hide them.

Each op has a reference in standard torch ops beside it (``_pruned_msa_reference``,
…); the functional ones are registered as decompositions (for ``run_decompositions``
and the ONNX exporter). Under functionalization (``torch.export``, ``torch.compile``)
and the TorchScript tracer the in-place ops become their inference op (the updated rows,
without the probabilities and saved activations) and a copy into x's prefix, which
those tools record with ops they know.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from patchslim_ext.ops._decompositions import decomposition

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


@torch.library.register_fake("patchslim::pruned_msa_inference")
def _pruned_msa_inference_fake(x, n_keep, num_heads, *params_and_eps):
    _check_x(x, n_keep, num_heads)
    return x.new_empty(x.shape[0], n_keep, x.shape[2])


@torch.library.register_fake("patchslim::pruned_msa_backward")
def _pruned_msa_backward_fake(grad_out, grad_attn, x, n_keep, num_heads, *rest):
    ln_weight, ln_bias, qkv_weight, _qkv_bias, proj_weight, proj_bias = rest[: len(_MSA_PARAMS)]
    return (
        torch.empty_like(x),
        torch.empty_like(ln_weight),
        torch.empty_like(ln_bias),
        torch.empty_like(qkv_weight),
        # Without a qkv_bias the op still returns the (3C,) gradient a zero bias would get.
        qkv_weight.new_empty(qkv_weight.shape[0]),
        torch.empty_like(proj_weight),
        torch.empty_like(proj_bias),
    )


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


@torch.library.register_fake("patchslim::pruned_mlp_inference")
def _pruned_mlp_inference_fake(x, *params_and_eps):
    torch._check(x.dim() == 3, lambda: f"x must have shape (B, n, C), got {tuple(x.shape)}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("patchslim::pruned_mlp_backward")
def _pruned_mlp_backward_fake(grad_out, x, *rest):
    params = rest[: len(_MLP_PARAMS)]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        *(torch.empty_like(p) for p in params),
    )


def _msa_setup_context(ctx, inputs, output) -> None:
    x, n_keep, num_heads, *params, eps, scale = inputs
    _out, attn, q, kv, context = output
    ctx.save_for_backward(x, *params, attn, q, kv, context)
    ctx.n_keep, ctx.num_heads, ctx.eps, ctx.scale = n_keep, num_heads, eps, scale
    # Unused outputs (the saved activations, often the probabilities) get None, not
    # zero tensors that autograd would allocate and fill on every backward.
    ctx.set_materialize_grads(False)


def _msa_backward(ctx, grad_out: Tensor | None, grad_attn: Tensor | None, *_saved_grads):
    x, *params, attn, q, kv, context = ctx.saved_tensors
    if grad_out is None and grad_attn is None:
        return (None,) * (len(params) + 5)
    if grad_out is None:
        grad_out = x.new_zeros(x.shape[0], ctx.n_keep, x.shape[2])
    grad_x, *param_grads = torch.ops.patchslim.pruned_msa_backward(
        grad_out,
        grad_attn,
        x,
        ctx.n_keep,
        ctx.num_heads,
        *params,
        ctx.eps,
        attn,
        q,
        kv,
        context,
        ctx.scale,
    )
    if params[_MSA_PARAMS.index("qkv_bias")] is None:
        param_grads[_MSA_PARAMS.index("qkv_bias")] = None
    return grad_x, None, None, *param_grads, None, None


def _mlp_setup_context(ctx, inputs, output) -> None:
    x, *params, eps = inputs
    ctx.save_for_backward(x, *params, output[1])
    ctx.eps = eps
    ctx.set_materialize_grads(False)  # no zero gradient for the saved pre-activation


def _mlp_backward(ctx, grad_out: Tensor | None, _grad_pre: Tensor | None):
    x, *params, pre = ctx.saved_tensors
    if grad_out is None:
        return (None,) * (len(params) + 2)
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


def _split_heads(t: Tensor, heads: int) -> Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _msa_projections(
    x: Tensor,
    n_keep: int,
    ln_weight: Tensor,
    ln_bias: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Q of the kept rows (B, n_keep, C) and K|V of every row (B, N, 2C) from LN1(x)."""
    channels = x.shape[-1]
    q_bias, kv_bias = (None, None) if qkv_bias is None else qkv_bias.split([channels, 2 * channels])
    normed = F.layer_norm(x, (channels,), ln_weight, ln_bias, eps)
    q = F.linear(normed[:, :n_keep], qkv_weight[:channels], q_bias)
    return q, F.linear(normed, qkv_weight[channels:], kv_bias)


def _pruned_msa_reference(
    x: Tensor,
    n_keep: int,
    num_heads: int,
    ln_weight: Tensor,
    ln_bias: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor,
    eps: float,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``patchslim::pruned_msa`` in standard torch ops, all five outputs."""
    channels = x.shape[-1]
    q, kv = _msa_projections(x, n_keep, ln_weight, ln_bias, qkv_weight, qkv_bias, eps)
    keys, values = (_split_heads(t, num_heads) for t in kv.split(channels, -1))
    if scale is None:
        scale = (channels // num_heads) ** -0.5
    logits = torch.matmul(_split_heads(q, num_heads), keys.transpose(-2, -1))
    attn = torch.softmax(logits * scale, -1)
    context = torch.matmul(attn, values).transpose(1, 2).flatten(2)
    out = x[:, :n_keep] + F.linear(context, proj_weight, proj_bias)
    return out, attn, q, kv, context


def _pruned_mlp_reference(
    x: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``patchslim::pruned_mlp`` in standard torch ops, both outputs."""
    pre = F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), fc1_weight)
    return x + F.linear(F.gelu(pre + fc1_bias), fc2_weight, fc2_bias), pre


def _pruned_mlp_inference_reference(x: Tensor, *args) -> Tensor:
    """``patchslim::pruned_mlp_inference``: the reference's first output."""
    return _pruned_mlp_reference(x, *args)[0]


def _msa_update(
    x: Tensor,
    n_keep: int,
    num_heads: int,
    ln_weight: Tensor,
    ln_bias: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor,
    eps: float,
    scale: float | None = None,
) -> Tensor:
    """What the attention sub-layer adds to the kept rows, (B, n_keep, C), when no
    probabilities are wanted: attention is ``scaled_dot_product_attention``, as a user
    would write the same maths in plain torch (the benchmarks' baseline)."""
    channels = x.shape[-1]
    q, kv = _msa_projections(x, n_keep, ln_weight, ln_bias, qkv_weight, qkv_bias, eps)
    keys, values = (_split_heads(t, num_heads) for t in kv.split(channels, -1))
    context = F.scaled_dot_product_attention(_split_heads(q, num_heads), keys, values, scale=scale)
    return F.linear(context.transpose(1, 2).flatten(2), proj_weight, proj_bias)


def _pruned_msa_inference_reference(x: Tensor, n_keep: int, *args) -> Tensor:
    """``patchslim::pruned_msa_inference``: the updated kept rows, (B, n_keep, C)."""
    return x[:, :n_keep] + _msa_update(x, n_keep, *args)


def _pruned_msa_inplace_reference(x: Tensor, n_keep: int, *args) -> None:
    """``patchslim::pruned_msa_``: the kept rows updated in ``x[:, :n_keep]``."""
    x[:, :n_keep] += _msa_update(x, n_keep, *args)


def _pruned_mlp_inplace_reference(x: Tensor, *args) -> None:
    """``patchslim::pruned_mlp_``: the reference written into ``x``."""
    x.copy_(_pruned_mlp_inference_reference(x, *args))


def _pruned_msa_backward_reference(
    grad_out: Tensor,
    grad_attn: Tensor | None,
    x: Tensor,
    n_keep: int,
    num_heads: int,
    ln_weight: Tensor,
    ln_bias: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor,
    eps: float,
    attn: Tensor,
    q: Tensor,
    kv: Tensor,
    context: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, ...]:
    """``patchslim::pruned_msa_backward``: the vector-Jacobian product of the reference,
    which recomputes the activations (``attn``, ``q``, ``kv``, ``context`` are not read)."""
    bias = torch.zeros_like(qkv_weight[:, 0]) if qkv_bias is None else qkv_bias
    _, vjp = torch.func.vjp(
        lambda x, *params: _pruned_msa_reference(x, n_keep, num_heads, *params, eps, scale)[:2],
        x,
        ln_weight,
        ln_bias,
        qkv_weight,
        bias,
        proj_weight,
        proj_bias,
    )
    return vjp((grad_out, torch.zeros_like(attn) if grad_attn is None else grad_attn))


def _pruned_mlp_backward_reference(
    grad_out: Tensor,
    x: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    eps: float,
    pre: Tensor,
) -> tuple[Tensor, ...]:
    """``patchslim::pruned_mlp_backward``: the vector-Jacobian product of the reference,
    which recomputes ``pre`` (not read)."""
    params = (ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    _, vjp = torch.func.vjp(
        lambda x, *params: _pruned_mlp_reference(x, *params, eps)[0], x, *params
    )
    return vjp(grad_out)


decomposition(torch.ops.patchslim.pruned_msa.default)(_pruned_msa_reference)
decomposition(torch.ops.patchslim.pruned_mlp.default)(_pruned_mlp_reference)
decomposition(torch.ops.patchslim.pruned_msa_inference.default)(_pruned_msa_inference_reference)
decomposition(torch.ops.patchslim.pruned_mlp_inference.default)(_pruned_mlp_inference_reference)


def _msa_via_inference_op(x: Tensor, n_keep: int, *args) -> None:
    x[:, :n_keep] = torch.ops.patchslim.pruned_msa_inference(x, n_keep, *args)


def _mlp_via_inference_op(x: Tensor, *args) -> None:
    x.copy_(torch.ops.patchslim.pruned_mlp_inference(x, *args))


# Functionalization would otherwise wrap the in-place ops in auto_functionalized, which
# no decomposition reaches, and the TorchScript tracer would record a node with no
# outputs, which the ONNX exporter (dynamo=False) drops without a word. The inference
# ops, not the functional ones, so that a compiled model runs what eager runs in place
# (no probabilities, no saved activations; the bf16-pair attention kernel).
_LIB = torch.library.Library("patchslim", "IMPL")
for _key in ("Functionalize", "Tracer"):
    _LIB.impl("pruned_msa_", _msa_via_inference_op, _key)
    _LIB.impl("pruned_mlp_", _mlp_via_inference_op, _key)


def pruned_msa(
    x: Tensor,
    n_keep: int,
    num_heads: int,
    ln_weight: Tensor,
    ln_bias: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor,
    eps: float = 1e-6,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The attention sub-layer of a pruned block.

    Args:
        x: (B, N, C) block input; rows [0, n_keep) are the kept tokens.
        qkv_weight, qkv_bias: (3C, C), (3C,) in timm's [q; k; v] layout; ``qkv_bias=None``
            for a projection without bias (T2T-ViT, timm's ``qkv_bias=False``).
        proj_weight, proj_bias: (C, C), (C,).
        eps: LN1's epsilon.
        scale: the logits' scale; ``None`` is ``head_dim**-0.5`` (T2T-ViT's pretrained
            models use ``embed_dim**-0.5``).

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
        scale,
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
