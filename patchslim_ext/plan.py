"""SlimPlan: which tokens every block of a slimmed ViT updates.

A plan is a token order π (the prefix tokens first — class, then distillation or
register tokens — then patches by the deepest block that keeps them) and keep counts
``n_1 >= … >= n_L >= 1``: block l updates the tokens ``π[:n_l]``. In that order every
kept set is a prefix (docs/design.md §3). Keep counts are validated here, once, for
every caller (:func:`check_keep_counts`).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def check_keep_counts(
    keep_counts: Sequence[int], num_tokens: int, depth: int | None = None
) -> tuple[int, ...]:
    """Keep counts as ints, checked: one per block (if ``depth`` is given), each in
    [1, N], non-increasing (nested kept sets). Raises ``ValueError`` naming the block."""
    counts = []
    for block, n in enumerate(keep_counts):
        # operator.index refuses floats and strings, which int() would truncate or parse;
        # bool passes it (an int subclass), so it is refused by name.
        try:
            if isinstance(n, bool):
                raise TypeError
            counts.append(operator.index(n))
        except TypeError:
            raise ValueError(f"keep_counts[{block}] must be an integer, got {n!r}") from None
    if not counts:
        raise ValueError("keep_counts must have one entry per block, got none")
    if depth is not None and len(counts) != depth:
        raise ValueError(f"keep_counts must have depth={depth} entries, got {len(counts)}")
    for block, n in enumerate(counts):
        if not 1 <= n <= num_tokens:
            raise ValueError(f"keep_counts[{block}] must be in [1, N={num_tokens}], got {n}")
        if block and n > counts[block - 1]:
            raise ValueError(
                f"keep_counts must be non-increasing (nested kept sets), but block {block} "
                f"keeps {n} > {counts[block - 1]}"
            )
    return tuple(counts)


@dataclass(frozen=True)
class SlimPlan:
    """Token order π, a LongTensor (N,) that starts with the prefix tokens
    ``0 … num_prefix_tokens-1`` in order, and keep counts ``[n_1, …, n_L]``,
    non-increasing, each in [1, N].

    ``num_prefix_tokens`` (class token, and distillation or register tokens) only
    constrains the order: the model checks that every block keeps the tokens its head
    reads.
    """

    token_order: Tensor
    keep_counts: tuple[int, ...]
    num_prefix_tokens: int

    def __init__(
        self,
        token_order: Tensor | Sequence[int],
        keep_counts: Sequence[int],
        num_prefix_tokens: int = 1,
    ) -> None:
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
        if (
            isinstance(num_prefix_tokens, bool)
            or not isinstance(num_prefix_tokens, int)
            or not 1 <= num_prefix_tokens <= tokens
        ):
            raise ValueError(
                f"num_prefix_tokens must be an int in [1, N={tokens}], got {num_prefix_tokens!r}"
            )
        prefix = torch.arange(num_prefix_tokens)
        if not torch.equal(order[:num_prefix_tokens], prefix):
            raise ValueError(
                f"token_order must start with the prefix tokens {prefix.tolist()} in order, "
                f"got {order[:num_prefix_tokens].tolist()}"
            )
        counts = check_keep_counts(keep_counts, tokens)
        object.__setattr__(self, "token_order", order)
        object.__setattr__(self, "keep_counts", counts)
        object.__setattr__(self, "num_prefix_tokens", num_prefix_tokens)

    @property
    def num_tokens(self) -> int:
        return self.token_order.numel()

    @property
    def depth(self) -> int:
        return len(self.keep_counts)

    @classmethod
    def dense(cls, num_tokens: int, depth: int, num_prefix_tokens: int = 1) -> SlimPlan:
        """Every block updates every token."""
        return cls(torch.arange(num_tokens), [num_tokens] * depth, num_prefix_tokens)

    @classmethod
    def from_masks(cls, masks: Tensor, num_prefix_tokens: int = 1) -> SlimPlan:
        """Plan from nested 0/1 keep masks (L, N) in the original token order.

        Tokens are ordered by the deepest block that keeps them (ties by index, so the
        prefix tokens, which every block keeps, stay first and in order), so that every
        mask becomes a prefix.
        """
        masks = torch.as_tensor(masks).bool().cpu()
        if masks.dim() != 2:
            raise ValueError(f"masks must have shape (L, N), got {tuple(masks.shape)}")
        if not masks[:, 0].all():
            raise ValueError("every block must keep the class token 0")
        if masks.shape[0] > 1 and not masks[:-1, :num_prefix_tokens].all():
            raise ValueError(
                f"every block but the last must keep the {num_prefix_tokens} prefix tokens"
            )
        if (masks[1:] & ~masks[:-1]).any():
            raise ValueError("masks must be nested: every block keeps a subset of the one before")
        depth_kept = masks.sum(0)  # blocks that keep each token (a prefix of the blocks)
        order = sorted(range(masks.shape[1]), key=lambda token: (-int(depth_kept[token]), token))
        return cls(torch.tensor(order), masks.sum(1).tolist(), num_prefix_tokens)

    def masks(self) -> Tensor:
        """(L, N) bool keep masks in the original token order."""
        masks = torch.zeros(self.depth, self.num_tokens, dtype=torch.bool)
        for block, n in enumerate(self.keep_counts):
            masks[block, self.token_order[:n]] = True
        return masks

    def to_json(self) -> str:
        return json.dumps(
            {
                "token_order": self.token_order.tolist(),
                "keep_counts": list(self.keep_counts),
                "num_prefix_tokens": self.num_prefix_tokens,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SlimPlan:
        """The plan :meth:`to_json` wrote; anything else raises ``ValueError``."""
        try:
            values = json.loads(text)
            if not isinstance(values, dict) or set(values) - {
                "token_order",
                "keep_counts",
                "num_prefix_tokens",
            }:
                raise ValueError("expected the keys token_order, keep_counts, num_prefix_tokens")
            order = values["token_order"]
            if not isinstance(order, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in order
            ):
                raise ValueError("token_order must be a list of integers")
            return cls(order, values["keep_counts"], values.get("num_prefix_tokens", 1))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a SlimPlan JSON document: {error}") from None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SlimPlan)
            and self.keep_counts == other.keep_counts
            and self.num_prefix_tokens == other.num_prefix_tokens
            and torch.equal(self.token_order, other.token_order)
        )

    def __hash__(self) -> int:
        return hash((tuple(self.token_order.tolist()), self.keep_counts, self.num_prefix_tokens))
