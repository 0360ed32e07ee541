"""Patch impact scores (paper Eq. 13) and the ablation baselines.

For block t with kept counts ``n_{t+1} >= ... >= n_L`` above it, the exact score of
token i is ``s_{t,i} = S_t[i, i] · Σ_h ‖(P_t^h |Z_{t-1}|)[i, :]‖²`` where ``S_L = I`` and
``S_{l-1} = Σ_h P_l^h[:n_l]ᵀ S_l[:n_l, :n_l] P_l^h[:n_l]`` (docs/design.md §5): Eq. 13's sum
over all H^(L-t) head paths, without enumerating them.

The chain is walked from the top. While its rank is small the state is a factor F
with ``S = Fᵀ F`` (a deep block keeps few tokens, so F has few rows); once F would
have more rows than the block it stands for, the state becomes the dense
``S[:n, :n]``, and only the top-left block that the next step reads is computed.
The last step yields only the diagonal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from patchslim_ext.ops.scoring import (
    patch_scores,
    score_chain_diagonal,
    score_chain_step,
    score_factor_step,
)
from patchslim_ext.settings import SCORE_METHODS


def _validate(attn: Sequence[Tensor], z_in: Tensor, keep_counts: Sequence[int]) -> tuple[int, int]:
    if len(attn) != len(keep_counts) + 1:
        raise ValueError(
            f"attn must hold block t's map and one map per entry of keep_counts "
            f"({len(keep_counts) + 1} in all), got {len(attn)}"
        )
    full = attn[0]
    if full.dim() != 4 or full.shape[2] != full.shape[3]:
        raise ValueError(
            f"attn[0] must be block t's full map (B, H, N, N), got {tuple(full.shape)}"
        )
    batch, _, tokens, _ = full.shape
    if batch == 0:
        raise ValueError("attn[0] has an empty batch")
    if z_in.dim() != 3 or z_in.shape[:2] != (batch, tokens):
        raise ValueError(
            f"z_in must have shape (B, N, C) = ({batch}, {tokens}, C), got {tuple(z_in.shape)}"
        )
    previous = tokens
    for j, (maps, kept) in enumerate(zip(attn[1:], keep_counts, strict=True), start=1):
        if not 1 <= kept <= previous:
            raise ValueError(
                f"keep_counts[{j - 1}] must be in [1, {previous}] (nested, non-increasing), "
                f"got {kept}"
            )
        expected = (batch, maps.shape[1] if maps.dim() == 4 else -1, kept, tokens)
        if maps.dim() != 4 or tuple(maps.shape) != expected:
            raise ValueError(
                f"attn[{j}] must have shape (B, H, n, N) = ({batch}, H, {kept}, {tokens}), "
                f"got {tuple(maps.shape)}"
            )
        previous = kept
    return batch, tokens


def _to_prefix_order(
    attn: Sequence[Tensor], z_in: Tensor, order: Tensor
) -> tuple[list[Tensor], Tensor]:
    """Permute tokens so that ``order[k]`` becomes position k (kept sets become prefixes).

    Key columns, block t's query rows and z_in's tokens are in the original order;
    the kept rows of ``attn[j >= 1]`` already list ``order[:n]``.
    """
    tokens = z_in.shape[1]
    order = order.to(device=z_in.device, dtype=torch.long)
    if order.shape != (tokens,) or not torch.equal(
        order.sort().values, torch.arange(tokens, device=order.device)
    ):
        raise ValueError(f"order must be a permutation of the {tokens} tokens")
    permuted = [attn[0][:, :, order][..., order]]
    permuted += [maps[..., order] for maps in attn[1:]]
    return permuted, z_in[:, order]


def chain_diagonal(attn_above: Sequence[Tensor]) -> Tensor:
    """``diag(S_t)``, (B, N), from the maps of blocks t+1 … L.

    Args:
        attn_above: ``[P_{t+1}, …, P_L]``, each (B, H, n_l, N) on its kept rows.
    """
    top = attn_above[-1]
    batch, kept = top.shape[0], top.shape[2]
    state = torch.eye(kept, dtype=top.dtype, device=top.device).expand(batch, kept, kept)
    factored = True  # S_L[:n_L, :n_L] = I = Iᵀ I
    for level in range(len(attn_above) - 1, 0, -1):
        maps = attn_above[level]
        heads, kept = maps.shape[1], maps.shape[2]
        next_kept = attn_above[level - 1].shape[2]
        if factored and heads * state.shape[1] > next_kept:
            columns = state[:, :, :kept]
            state = torch.bmm(columns.transpose(1, 2), columns)
            factored = False
        if factored:
            state = score_factor_step(state, maps, next_kept)
        else:
            state = score_chain_step(state, maps, next_kept)
    return score_chain_diagonal(state, attn_above[0], factored)


def _rollout_scores(attn: Sequence[Tensor], z_abs: Tensor) -> Tensor:
    """Head-summed chain: ‖Ā[:, i]‖² ‖(P̄_t |Z|)[i]‖², Ā = Π diag(m_l) Σ_h P_l^h."""
    batch, tokens = z_abs.shape[:2]
    if len(attn) == 1:
        column_norms = z_abs.new_ones(batch, tokens)
    else:
        top_kept = attn[-1].shape[2]
        rows = torch.eye(top_kept, dtype=z_abs.dtype, device=z_abs.device).expand(batch, -1, -1)
        for maps in reversed(attn[1:]):
            rows = rows[:, :, : maps.shape[2]] @ maps.sum(1)
        column_norms = rows.square().sum(1)
    return column_norms * (attn[0].sum(1) @ z_abs).square().sum(-1)


def per_image_scores(
    attn: Sequence[Tensor],
    z_in: Tensor,
    keep_counts: Sequence[int],
    method: str = "impact",
) -> Tensor:
    """Scores of every token for every image, (B, N); see :func:`impact_scores`.

    ``method="random"`` has no per-image form and is refused here.
    """
    if method not in SCORE_METHODS[:3]:
        raise ValueError(f"method must be one of {SCORE_METHODS[:3]} here, got {method!r}")
    _validate(attn, z_in, keep_counts)
    compute_dtype = torch.float64 if z_in.dtype == torch.float64 else torch.float32
    attn = [maps.to(compute_dtype) for maps in attn]
    z_in = z_in.to(compute_dtype)
    with torch.no_grad():
        if method == "attn":
            return attn[0].square().sum((1, 3))
        if method == "rollout":
            return _rollout_scores(attn, z_in.abs())
        s_diag = z_in.new_ones(z_in.shape[:2]) if len(attn) == 1 else chain_diagonal(attn[1:])
        return patch_scores(s_diag, attn[0], z_in)


def impact_scores(
    attn: Sequence[Tensor],
    z_in: Tensor,
    keep_counts: Sequence[int],
    order: Tensor | None = None,
    *,
    method: str = "impact",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Batch-mean scores ``s_t`` of block t's tokens, (N,).

    Args:
        attn: ``attn[0]`` is block t's full map (B, H, N, N); ``attn[j]`` for j >= 1 is
            block t+j's map on its kept rows, (B, H, n_{t+j}, N).
        z_in: (B, N, C), block t's input ``Z_{t-1}``.
        keep_counts: ``[n_{t+1}, …, n_L]``, non-increasing.
        order: None if tokens are in prefix order (block l keeps tokens ``[0, n_l)``);
            else the token order π (LongTensor of N): columns, block t's rows and
            z_in are in the original order, the kept rows of ``attn[j >= 1]`` list
            ``π[:n]``, and the scores come back in the original order.
        method: ``"impact"`` (exact Eq. 13), ``"rollout"`` (head-summed chain, the
            square of the sum over paths), ``"attn"`` (``Σ_h ‖P_t^h[i, :]‖²``, the
            paper's Attn baseline) or ``"random"``.
        generator: random source for ``method="random"``.

    Returns:
        (N,) float32 (float64 for float64 inputs) scores, larger = keep.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"method must be one of {SCORE_METHODS}, got {method!r}")
    if method == "random":
        _validate(attn, z_in, keep_counts)
        return torch.rand(z_in.shape[1], generator=generator).to(z_in.device)
    if order is not None:
        _validate(attn, z_in, keep_counts)
        attn, z_in = _to_prefix_order(attn, z_in, order)
    scores = per_image_scores(attn, z_in, keep_counts, method).mean(0)
    if order is None:
        return scores
    original = torch.empty_like(scores)
    original[order.to(scores.device)] = scores
    return original


class ScoreAccumulator:
    """Running batch-mean of scores over calibration batches, one batch at a time.

    ``update`` takes the same arguments as :func:`impact_scores` for one batch;
    ``scores()`` returns the mean over every image seen. ``total`` (float64) and
    ``count`` are public so that distributed runs can all-reduce them.
    """

    def __init__(
        self,
        tokens: int,
        method: str = "impact",
        order: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if method not in SCORE_METHODS:
            raise ValueError(f"method must be one of {SCORE_METHODS}, got {method!r}")
        self.method = method
        self.order = order
        self.generator = generator
        self.total = torch.zeros(tokens, dtype=torch.float64)
        self.count = 0

    def update(self, attn: Sequence[Tensor], z_in: Tensor, keep_counts: Sequence[int]) -> None:
        batch = z_in.shape[0]
        if self.method == "random":
            _validate(attn, z_in, keep_counts)
        else:
            batch_mean = impact_scores(attn, z_in, keep_counts, self.order, method=self.method)
            self.total += batch_mean.double().cpu() * batch
        self.count += batch

    def scores(self) -> Tensor:
        if self.count == 0:
            raise RuntimeError("no calibration batch was added")
        if self.method == "random":
            return torch.rand(self.total.shape[0], generator=self.generator, dtype=torch.float64)
        return self.total / self.count
