"""PrunedViT: a VisionTransformer whose blocks update only the tokens a SlimPlan keeps."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from patchslim_ext.ops.pruned_block import pruned_mlp, pruned_msa
from patchslim_ext.plan import SlimPlan
from patchslim_ext.vit import Block, VisionTransformer


def _msa_args(block: Block) -> tuple:
    attn = block.attn
    return (
        block.norm1.weight,
        block.norm1.bias,
        attn.qkv.weight,
        attn.qkv.bias,
        attn.proj.weight,
        attn.proj.bias,
        block.norm1.eps,
    )


def _mlp_args(block: Block) -> tuple:
    mlp = block.mlp
    return (
        block.norm2.weight,
        block.norm2.bias,
        mlp.fc1.weight,
        mlp.fc1.bias,
        mlp.fc2.weight,
        mlp.fc2.bias,
        block.norm2.eps,
    )


def pruned_block_rows(
    block: Block, x: Tensor, n_keep: int, num_heads: int
) -> tuple[Tensor, Tensor]:
    """Block ``block`` on tokens ``x`` (B, N, C) updating rows ``[0, n_keep)`` (paper Eq. 2).

    Returns the updated rows (B, n_keep, C) and the attention probabilities
    (B, H, n_keep, N); differentiable in ``x`` and the block's parameters.
    """
    kept, probs = pruned_msa(x, n_keep, num_heads, *_msa_args(block))
    return pruned_mlp(kept, *_mlp_args(block)), probs


def pruned_block(block: Block, x: Tensor, n_keep: int, num_heads: int) -> tuple[Tensor, Tensor]:
    """:func:`pruned_block_rows`, with the untouched rows appended: (B, N, C) and the
    attention probabilities (B, H, n_keep, N)."""
    kept, probs = pruned_block_rows(block, x, n_keep, num_heads)
    if n_keep == x.shape[1]:
        return kept, probs
    return torch.cat((kept, x[:, n_keep:]), dim=1), probs


class PrunedViT(nn.Module):
    """A slimmed ViT: block l updates tokens ``plan.token_order[:n_l]`` only.

    Tokens are permuted once, after the position embedding, into the plan's order;
    from then on block l reads all N rows for keys and values and updates rows
    ``[0, n_l)``: no gather, no scatter. Under ``torch.no_grad()`` the rows are
    updated in place; with autograd, kept rows are concatenated with the untouched
    ones. The parameters are the wrapped model's (same names as timm's).

    Input: (B, in_chans, H, W) images. Output: (B, num_classes) logits.
    """

    def __init__(self, model: VisionTransformer, plan: SlimPlan) -> None:
        super().__init__()
        config = model.config
        if plan.num_tokens != config.num_tokens or plan.depth != config.depth:
            raise ValueError(
                f"plan is for {plan.num_tokens} tokens and {plan.depth} blocks, the model has "
                f"{config.num_tokens} tokens and {config.depth} blocks"
            )
        self.config = config
        self.plan = plan
        self.patch_embed = model.patch_embed
        self.cls_token = model.cls_token
        self.pos_embed = model.pos_embed
        self.blocks = model.blocks
        self.norm = model.norm
        self.head = model.head
        # The model's own embedding and head: the same modules, registered above.
        self._embed = model.embed
        self._classify = model.forward_head
        self.register_buffer("token_order", plan.token_order.clone(), persistent=False)
        self._identity_order = bool(torch.equal(plan.token_order, torch.arange(plan.num_tokens)))

    def forward_tokens(
        self, images: Tensor, attention_blocks: Iterable[int] = ()
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """(B, N, C) tokens after the last block, in the plan's order, and the attention
        probabilities (B, H, n_l, N) of the requested blocks (0-indexed)."""
        wanted = set(attention_blocks)
        x = self._embed(images)
        if not self._identity_order:
            x = x[:, self.token_order]
        heads = self.config.num_heads
        attention = {}
        in_place = not torch.is_grad_enabled()
        for index, (block, n_keep) in enumerate(
            zip(self.blocks, self.plan.keep_counts, strict=True)
        ):
            if in_place and index not in wanted:
                torch.ops.patchslim.pruned_msa_(x, n_keep, heads, *_msa_args(block))
                torch.ops.patchslim.pruned_mlp_(x[:, :n_keep], *_mlp_args(block))
                continue
            if in_place:
                kept, probs = pruned_block_rows(block, x, n_keep, heads)
                x[:, :n_keep] = kept
            else:
                x, probs = pruned_block(block, x, n_keep, heads)
            if index in wanted:
                attention[index] = probs
        return x, attention

    def forward_head(self, tokens: Tensor) -> Tensor:
        """Class-token logits; the class token is first in every plan's order."""
        return self._classify(tokens)

    def forward_with_attention(
        self, images: Tensor, attention_blocks: Iterable[int]
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Logits and ``{block: (B, H, n_block, N) attention probabilities}``."""
        tokens, attention = self.forward_tokens(images, attention_blocks)
        return self.forward_head(tokens), attention

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_tokens(images)[0])
