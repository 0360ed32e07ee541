"""SlimPlan: which tokens every block of a slimmed ViT updates.

A plan is a token order π (class token first, then tokens by the deepest block
that keeps them) and keep counts ``n_1 >= … >= n_L >= 1``: block l updates the
tokens ``π[:n_l]``. In that order every kept set is a prefix (DESIGN.md §3).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SlimPlan:
    """Token order π, a LongTensor (N,) with π[0] = 0 (the class token), and keep counts
    ``[n_1, …, n_L]``, non-increasing, each in [1, N]."""

    token_order: Tensor
    keep_counts: tuple[int, ...]

    def __init__(self, token_order: Tensor | Sequence[int], keep_counts: Sequence[int]) -> None:
        order = torch.as_tensor(token_order)
        if order.dim() != 1 or order.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"token_order must be a 1-D integer tensor, got {order.dtype} "
                f"of shape {tuple(order.shape)}"
            )
        order = order.to(torch.long).cpu()
        tokens = order.numel()
        if tokens == 0 or not torch.equal(order.sort().values, torch.arange(tokens)):
            raise ValueError(f"token_order must be a permutation of 0..{tokens - 1}")
        if order[0].item() != 0:
            raise ValueError(
                f"token_order must start with the class token 0, got {order[0].item()}"
            )
        counts = tuple(int(n) for n in keep_counts)
        if not counts:
            raise ValueError("keep_counts must have one entry per block, got none")
        for block, n in enumerate(counts):
            if not 1 <= n <= tokens:
                raise ValueError(f"keep_counts[{block}] must be in [1, N={tokens}], got {n}")
            if block and n > counts[block - 1]:
                raise ValueError(
                    f"keep_counts must be non-increasing (nested kept sets), but block {block} "
                    f"keeps {n} > {counts[block - 1]}"
                )
        object.__setattr__(self, "token_order", order)
        object.__setattr__(self, "keep_counts", counts)

    @property
    def num_tokens(self) -> int:
        return self.token_order.numel()

    @property
    def depth(self) -> int:
        return len(self.keep_counts)

    @classmethod
    def dense(cls, num_tokens: int, depth: int) -> SlimPlan:
        """Every block updates every token."""
        return cls(torch.arange(num_tokens), [num_tokens] * depth)

    @classmethod
    def from_masks(cls, masks: Tensor) -> SlimPlan:
        """Plan from nested 0/1 keep masks (L, N) in the original token order.

        Tokens are ordered by the deepest block that keeps them (ties by index), so
        that every mask becomes a prefix.
        """
        masks = torch.as_tensor(masks).bool().cpu()
        if masks.dim() != 2:
            raise ValueError(f"masks must have shape (L, N), got {tuple(masks.shape)}")
        if not masks[:, 0].all():
            raise ValueError("every block must keep the class token 0")
        if (masks[1:] & ~masks[:-1]).any():
            raise ValueError("masks must be nested: every block keeps a subset of the one before")
        depth_kept = masks.sum(0)  # blocks that keep each token (a prefix of the blocks)
        order = sorted(range(masks.shape[1]), key=lambda token: (-int(depth_kept[token]), token))
        return cls(torch.tensor(order), masks.sum(1).tolist())

    def masks(self) -> Tensor:
        """(L, N) bool keep masks in the original token order."""
        masks = torch.zeros(self.depth, self.num_tokens, dtype=torch.bool)
        for block, n in enumerate(self.keep_counts):
            masks[block, self.token_order[:n]] = True
        return masks

    def to_json(self) -> str:
        return json.dumps(
            {"token_order": self.token_order.tolist(), "keep_counts": list(self.keep_counts)}
        )

    @classmethod
    def from_json(cls, text: str) -> SlimPlan:
        try:
            values = json.loads(text)
            return cls(values["token_order"], values["keep_counts"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"not a SlimPlan JSON document: {error}") from None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SlimPlan)
            and self.keep_counts == other.keep_counts
            and torch.equal(self.token_order, other.token_order)
        )

    def __hash__(self) -> int:
        return hash((tuple(self.token_order.tolist()), self.keep_counts))
