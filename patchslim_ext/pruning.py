"""Pruning as a mode of the model: blocks that update a prefix of the tokens, and the
plan-driven forward of a whole ViT.

Both work on any pre-norm ViT with timm's attribute names — our
:class:`~patchslim_ext.vit.VisionTransformer` and a timm ``VisionTransformer`` patched
by :func:`patchslim_ext.timm_models.prunable` — through this protocol:

- a block has ``norm1``, ``attn.qkv`` (bias optional), ``attn.proj``, ``attn.num_heads``,
  ``attn.scale``, ``ls1``/``ls2`` (identity, or a layer scale with ``gamma``),
  ``norm2``, ``mlp.fc1``, ``mlp.fc2`` (exact GELU between them);
- a model has ``config`` (a :class:`~patchslim_ext.vit.ViTConfig`), ``embed(images)``,
  ``blocks``, ``norm`` and timm's ``forward_head(tokens, pre_logits=False)``.

Layer scale folds into the projection that precedes it: ``γ ⊙ (W c + b) = (diag(γ) W) c
+ γ ⊙ b`` (docs/design.md §2), so the block ops need no layer-scale argument and the
gradients of γ and W flow through the fold.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from patchslim_ext.ops.pruned_block import (
    _pruned_mlp_reference,
    _pruned_msa_inference_reference,
    _pruned_msa_reference,
    pruned_mlp,
    pruned_msa,
)
from patchslim_ext.plan import SlimPlan


def _member(module: nn.Module, name: str) -> Any:
    """``getattr(module, name)``, read straight from the module's parameter and submodule
    dicts when registered there. ``nn.Module.__getattr__`` costs about 0.7 µs per lookup;
    a block's arguments take 16 per call, which shows at batch 1. Anything else (a
    parametrized weight, a buffer, a None bias) goes through ``getattr``."""
    found = module._parameters.get(name)
    if found is None:
        found = module._modules.get(name)
    return found if found is not None else getattr(module, name)


def _folded(linear: nn.Module, layer_scale: nn.Module) -> tuple[Tensor, Tensor]:
    weight, bias = _member(linear, "weight"), _member(linear, "bias")
    if isinstance(layer_scale, nn.Identity):
        return weight, bias
    gamma = getattr(layer_scale, "gamma", None)
    if gamma is None:
        return weight, bias
    return gamma[:, None] * weight, gamma * bias


def msa_arguments(block: nn.Module) -> tuple[Any, ...]:
    """The parameters of ``pruned_msa`` after ``x, n_keep, num_heads``, from a block."""
    attn, norm = _member(block, "attn"), _member(block, "norm1")
    qkv = _member(attn, "qkv")
    proj_weight, proj_bias = _folded(_member(attn, "proj"), _member(block, "ls1"))
    return (
        _member(norm, "weight"),
        _member(norm, "bias"),
        _member(qkv, "weight"),
        _member(qkv, "bias"),
        proj_weight,
        proj_bias,
        norm.eps,
        attn.scale,
    )


def mlp_arguments(block: nn.Module) -> tuple[Any, ...]:
    """The parameters of ``pruned_mlp`` after ``x``, from a block."""
    mlp, norm = _member(block, "mlp"), _member(block, "norm2")
    fc1 = _member(mlp, "fc1")
    fc2_weight, fc2_bias = _folded(_member(mlp, "fc2"), _member(block, "ls2"))
    return (
        _member(norm, "weight"),
        _member(norm, "bias"),
        _member(fc1, "weight"),
        _member(fc1, "bias"),
        fc2_weight,
        fc2_bias,
        norm.eps,
    )


def pruned_block(
    block: nn.Module, x: Tensor, n_keep: int, return_attention: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Block on tokens x (B, N, C) updating only rows ``[0, n_keep)`` (paper Eq. 2).

    Returns (B, N, C) (the other rows unchanged), and with ``return_attention`` the
    attention probabilities (B, H, n_keep, N). Differentiable in x and the parameters.
    """
    kept, probs = _kept_rows(block, x, n_keep, return_attention)
    out = kept if n_keep == x.shape[1] else torch.cat((kept, x[:, n_keep:]), dim=1)
    return (out, probs) if return_attention else out


def pruned_block_(block: nn.Module, x: Tensor, n_keep: int) -> None:
    """:func:`pruned_block` written into ``x[:, :n_keep]`` in place (inference)."""
    if torch.is_autocast_enabled(x.device.type):
        x[:, :n_keep] = _kept_rows(block, x, n_keep, with_probs=False)[0]
        return
    torch.ops.patchslim.pruned_msa_(x, n_keep, block.attn.num_heads, *msa_arguments(block))
    torch.ops.patchslim.pruned_mlp_(x[:, :n_keep], *mlp_arguments(block))


def _kept_rows(
    block: nn.Module, x: Tensor, n_keep: int, with_probs: bool
) -> tuple[Tensor, Tensor | None]:
    """The updated rows (B, n_keep, C) and the attention probabilities (B, H, n_keep, N);
    the probabilities may be None where ``with_probs`` is False."""
    heads, arguments = block.attn.num_heads, msa_arguments(block)
    if torch.is_autocast_enabled(x.device.type):
        # Under autocast the block runs its reference in standard ops, so that torch's own
        # per-op policy applies (GEMMs in the low dtype; norms and residuals in float32);
        # the fused ops would run all of it in the low dtype. Cast weights
        # (model.to(torch.bfloat16)) run our kernels in bf16. Without probabilities to
        # return, attention is torch's SDPA, as in the dense model; the explicit softmax
        # that returns them takes logits already rounded to the low dtype by the matmul.
        if with_probs:
            kept, probs, *_ = _pruned_msa_reference(x, n_keep, heads, *arguments)
        else:
            kept, probs = _pruned_msa_inference_reference(x, n_keep, heads, *arguments), None
        return _pruned_mlp_reference(kept, *mlp_arguments(block))[0], probs
    kept, probs = pruned_msa(x, n_keep, heads, *arguments)
    return pruned_mlp(kept, *mlp_arguments(block)), probs


def check_plan(config: Any, plan: SlimPlan) -> None:
    """Raise ``ValueError`` unless ``plan`` fits a model of ``config``."""
    if plan.num_tokens != config.num_tokens or plan.depth != config.depth:
        raise ValueError(
            f"plan is for {plan.num_tokens} tokens and {plan.depth} blocks, the model has "
            f"{config.num_tokens} tokens and {config.depth} blocks"
        )
    if plan.num_prefix_tokens != config.num_prefix_tokens:
        raise ValueError(
            f"plan has {plan.num_prefix_tokens} prefix tokens, the model {config.num_prefix_tokens}"
        )
    if plan.keep_counts[-1] < config.num_head_tokens:
        raise ValueError(
            f"the last block keeps {plan.keep_counts[-1]} token(s), but the head reads "
            f"{config.num_head_tokens}"
        )


class PrunableViT:
    """Mixin: a ViT that runs a :class:`SlimPlan` once one is set.

    With a plan, tokens are permuted once, after the embedding, into the plan's order;
    then block l reads all N rows for keys and values and updates rows ``[0, n_l)``: no
    gather, no scatter (docs/design.md §3). Under ``torch.no_grad()`` the rows are
    updated in place; with autograd, kept rows are concatenated with the untouched ones.
    The plan is not part of the state dict: the weights are the dense model's.
    """

    plan: SlimPlan | None

    def set_plan(self, plan: SlimPlan | None) -> PrunableViT:
        """Run ``plan`` from now on (None: dense). Returns the model."""
        if plan is not None:
            check_plan(self.config, plan)
        self.plan = plan
        # Decided once here: a data-dependent test in forward would stop torch.compile.
        self._permutes_tokens = plan is not None and not torch.equal(
            plan.token_order, torch.arange(plan.num_tokens)
        )
        order = None
        if plan is not None:
            order = plan.token_order.to(next(self.parameters()).device)
        # A buffer follows .to(device); non-persistent, so the state dict stays the dense one.
        self.register_buffer("token_order", order, persistent=False)
        return self

    @property
    def keep_counts(self) -> list[int]:
        """Tokens each block updates: the plan's counts, or N for every block."""
        if self.plan is None:
            return [self.config.num_tokens] * self.config.depth
        return list(self.plan.keep_counts)

    def forward_tokens(
        self, images: Tensor, attention_blocks: Iterable[int] = ()
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """(B, N, C) tokens after the last block, before the final norm, in the plan's
        token order, and ``{block: (B, H, n_block, N) attention probabilities}`` for the
        requested blocks (0-indexed)."""
        wanted = set(attention_blocks)
        x = self.embed(images)
        attention = {}
        if self.plan is None:
            for index, block in enumerate(self.blocks):
                if index in wanted:
                    x, attention[index] = block(x, return_attention=True)
                else:
                    x = block(x)
            return x, attention
        if self._permutes_tokens:
            x = x.index_select(1, self.token_order)
        in_place = not torch.is_grad_enabled()
        for index, (block, n_keep) in enumerate(
            zip(self.blocks, self.plan.keep_counts, strict=True)
        ):
            if index in wanted:
                x, attention[index] = block(x, n_keep, return_attention=True)
            elif in_place:
                pruned_block_(block, x, n_keep)
            else:
                x = block(x, n_keep)
        return x, attention

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, N, C) normalised tokens in the original token order (timm's contract)."""
        tokens = self.norm(self.forward_tokens(images)[0])
        if self._permutes_tokens:
            tokens = tokens.index_select(1, torch.argsort(self.token_order))
        return tokens

    def forward(self, images: Tensor) -> Tensor:
        """(B, num_classes) logits; only the tokens the head reads are normalised."""
        tokens = self.forward_tokens(images)[0]
        return self.forward_head(self.norm(tokens[:, : self.config.num_head_tokens]))
