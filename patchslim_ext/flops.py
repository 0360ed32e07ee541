"""FLOP counts: measured with fvcore, and the analytic formula of docs/design.md §4.

fvcore's convention holds throughout: one multiply-add is one FLOP, LayerNorm
costs 5 per element, element-wise ops (residual adds, GELU, softmax) are free.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

from patchslim_ext.plan import check_keep_counts
from patchslim_ext.t2t import TokensToToken
from patchslim_ext.vit import ViTConfig

# Affine LayerNorm: mean, variance, normalise, scale, shift (fvcore's figure).
LAYER_NORM_FLOPS_PER_ELEMENT = 5

# Ops fvcore has no handle for, free under its convention: element-wise ops (residual
# adds, GELU, softmax; the T2T performer's feature map, |x|² as a squared vector norm,
# normaliser division and sum) and the T2T soft splits (aten::pad, aten::as_strided),
# the reordering of their features (aten::unflatten) and a slimmed model's token
# permutation (aten::index_select), pure rearrangements.
FREE_OPS = (
    "aten::add",
    "aten::add_",
    "aten::sub",
    "aten::mul",
    "aten::div",
    "aten::exp",
    "aten::exp_",
    "aten::linalg_vector_norm",
    "aten::square",
    "aten::sum",
    "aten::gelu",
    "aten::softmax",
    "aten::pad",
    "aten::as_strided",
    "aten::unflatten",
    "aten::index_select",
)


def _prod(values: Sequence[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def _sdpa_flops(inputs: list[Any], outputs: list[Any]) -> int:
    # q (..., Lq, E), k (..., Lk, E), v (..., Lk, Ev): Q·Kᵀ and P·V.
    q_shape, k_shape, v_shape = (get_shape(value) for value in inputs[:3])
    *batch, queries, dim = q_shape
    keys = k_shape[-2]
    return _prod(batch) * queries * keys * (dim + v_shape[-1])


def _prefix_layer_norm_flops(inputs: list[Any], outputs: list[Any]) -> int:
    return LAYER_NORM_FLOPS_PER_ELEMENT * _prod(get_shape(outputs[0]))


def msa_flops(tokens: int, kept: int, channels: int) -> int:
    """Attention sub-layer, one image: LN1 and K, V on all N tokens; Q, Q·Kᵀ, P·V and
    the output projection on the kept ones."""
    return (
        LAYER_NORM_FLOPS_PER_ELEMENT * tokens * channels
        + 2 * tokens * channels * channels
        + 2 * kept * channels * channels
        + 2 * kept * tokens * channels
    )


def mlp_flops(kept: int, channels: int, hidden: int) -> int:
    """MLP sub-layer on the kept tokens, one image: LN2, FC1, FC2."""
    return kept * (LAYER_NORM_FLOPS_PER_ELEMENT * channels + 2 * channels * hidden)


def _pruned_msa_flops(inputs: list[Any], outputs: list[Any]) -> int:
    batch, tokens, channels = get_shape(inputs[0])
    return batch * msa_flops(tokens, int(inputs[1].toIValue()), channels)


def _pruned_mlp_flops(inputs: list[Any], outputs: list[Any]) -> int:
    batch, kept, channels = get_shape(inputs[0])
    return batch * mlp_flops(kept, channels, get_shape(inputs[3])[0])


OP_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_flops,
    "patchslim::prefix_layer_norm": _prefix_layer_norm_flops,
    "patchslim::pruned_msa": _pruned_msa_flops,
    "patchslim::pruned_mlp": _pruned_mlp_flops,
    # The in-place ops, as the tracer records them.
    "patchslim::pruned_msa_inference": _pruned_msa_flops,
    "patchslim::pruned_mlp_inference": _pruned_mlp_flops,
}


def flop_analysis(model: nn.Module, inputs: Any) -> FlopCountAnalysis:
    """fvcore's ``FlopCountAnalysis`` with handles for attention and every patchslim op."""
    analysis = FlopCountAnalysis(model, inputs)
    # patchslim ops read the blocks' parameters without calling their submodules,
    # which fvcore would report as "never called".
    analysis.uncalled_modules_warnings(False)
    analysis.set_op_handle(**OP_HANDLES)
    analysis.set_op_handle(**dict.fromkeys(FREE_OPS))
    return analysis


def count_flops(model: nn.Module, inputs: Any) -> int:
    """Total FLOPs of ``model(*inputs)`` (or ``model(inputs)``) counted by fvcore."""
    return int(flop_analysis(model, inputs).total())


def block_flops(config: ViTConfig, n_keep: int) -> int:
    """FLOPs of one block that updates ``n_keep`` of its N tokens, for one image.

    LN1 and the K, V projections run on all N tokens; Q, attention, the output
    projection, LN2 and the MLP on the kept ones. ``n_keep = N`` is the dense block.
    """
    return msa_flops(config.num_tokens, n_keep, config.embed_dim) + mlp_flops(
        n_keep, config.embed_dim, config.mlp_hidden
    )


@functools.cache
def _t2t_flops(embed: str, img_size: int, in_chans: int, embed_dim: int) -> int:
    # The tokens-to-token module runs dense; its FLOPs are fvcore's count of it (its
    # performer layers mix einsum, exp and norms, which a formula would only restate).
    module = TokensToToken(img_size, embed.removeprefix("t2t_"), in_chans, embed_dim)
    images = torch.zeros(1, in_chans, img_size, img_size)
    with torch.no_grad():
        return count_flops(module.eval(), (images,))


def embed_flops(config: ViTConfig) -> int:
    """FLOPs of the patch (or tokens-to-token) embedding, one image."""
    if config.embed == "patch":
        return config.num_patches * config.embed_dim * config.in_chans * config.patch_size**2
    return _t2t_flops(config.embed, config.img_size, config.in_chans, config.embed_dim)


def flops_of(
    config: ViTConfig, keep_counts: Sequence[int] | None = None, batch_size: int = 1
) -> int:
    """Analytic FLOPs of a ViT whose block l updates ``keep_counts[l]`` tokens.

    ``keep_counts=None`` is the dense model. Agrees exactly with :func:`count_flops`.
    The head normalises and classifies only the tokens it reads (one, or two for a
    distilled model).
    """
    counts = (
        [config.num_tokens] * config.depth
        if keep_counts is None
        else check_keep_counts(keep_counts, config.num_tokens, config.depth)
    )
    blocks = sum(block_flops(config, n) for n in counts)
    head = config.num_head_tokens * (
        LAYER_NORM_FLOPS_PER_ELEMENT * config.embed_dim + config.embed_dim * config.num_classes
    )
    return batch_size * (embed_flops(config) + blocks + head)
