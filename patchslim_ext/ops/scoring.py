"""Fake kernels and Python entry points of the scoring ops (paper Eq. 13).

The ops are not differentiable: scores are computed under ``torch.no_grad``.
"""

import torch
from torch import Tensor

from patchslim_ext.ops._decompositions import decomposition


def _check_attn(attn: Tensor) -> tuple[int, int, int, int]:
    torch._check(attn.dim() == 4, lambda: f"attn must have shape (B, H, n, N), got {attn.shape}")
    batch, heads, kept, tokens = attn.shape
    torch._check(kept <= tokens, lambda: f"attn has n={kept} > N={tokens}")
    return batch, heads, kept, tokens


@torch.library.register_fake("patchslim::score_chain_step")
def _score_chain_step_fake(S: Tensor, attn: Tensor, n_out: int) -> Tensor:
    batch, _, kept, tokens = _check_attn(attn)
    torch._check(S.dim() == 3 and S.shape[1] == S.shape[2], lambda: "S must be (B, M, M)")
    torch._check(S.shape[2] >= kept, lambda: "S must cover the n kept rows")
    torch._check(0 <= n_out <= tokens, lambda: f"n_out must be in [0, {tokens}]")
    return attn.new_empty(batch, n_out, n_out)


@torch.library.register_fake("patchslim::score_factor_step")
def _score_factor_step_fake(F: Tensor, attn: Tensor, n_out: int) -> Tensor:
    batch, heads, kept, tokens = _check_attn(attn)
    torch._check(F.dim() == 3 and F.shape[2] >= kept, lambda: "F must be (B, R, M), M >= n")
    torch._check(0 <= n_out <= tokens, lambda: f"n_out must be in [0, {tokens}]")
    return attn.new_empty(batch, heads * F.shape[1], n_out)


@torch.library.register_fake("patchslim::score_chain_diagonal")
def _score_chain_diagonal_fake(state: Tensor, attn: Tensor, factored: bool) -> Tensor:
    batch, _, kept, tokens = _check_attn(attn)
    torch._check(state.dim() == 3 and state.shape[2] >= kept, lambda: "state must cover n rows")
    return attn.new_empty(batch, tokens)


@torch.library.register_fake("patchslim::patch_scores")
def _patch_scores_fake(s_diag: Tensor, attn: Tensor, z_in: Tensor) -> Tensor:
    batch, _, kept, tokens = _check_attn(attn)
    torch._check(kept == tokens, lambda: "attn must be block t's full map (B, H, N, N)")
    return attn.new_empty(batch, tokens)


# References in standard torch ops, beside each op (as torchvision keeps _roi_align);
# registered as decompositions below.


def _score_chain_step_reference(S: Tensor, attn: Tensor, n_out: int) -> Tensor:
    kept = attn.shape[2]
    P = attn[..., :n_out]
    return torch.matmul(P.transpose(-2, -1), torch.matmul(S[:, None, :kept, :kept], P)).sum(1)


def _score_factor_step_reference(F: Tensor, attn: Tensor, n_out: int) -> Tensor:
    batch, heads, kept, _ = attn.shape
    G = torch.matmul(F[:, None, :, :kept], attn[..., :n_out])  # (B, H, R, n_out)
    # Rows r·H + h, the op's order (FᵀF does not depend on it).
    return G.transpose(1, 2).reshape(batch, F.shape[1] * heads, n_out)


def _score_chain_diagonal_reference(state: Tensor, attn: Tensor, factored: bool) -> Tensor:
    if factored:
        return _score_factor_step_reference(state, attn, attn.shape[3]).square().sum(1)
    kept = attn.shape[2]
    return (attn * torch.matmul(state[:, None, :kept, :kept], attn)).sum((1, 2))


def _patch_scores_reference(s_diag: Tensor, attn: Tensor, z_in: Tensor) -> Tensor:
    return s_diag * torch.matmul(attn, z_in.abs()[:, None]).square().sum((1, 3))


for _name, _reference in (
    ("score_chain_step", _score_chain_step_reference),
    ("score_factor_step", _score_factor_step_reference),
    ("score_chain_diagonal", _score_chain_diagonal_reference),
    ("patch_scores", _patch_scores_reference),
):
    decomposition(getattr(torch.ops.patchslim, _name).default)(_reference)


def score_chain_step(S: Tensor, attn: Tensor, n_out: int) -> Tensor:
    """One step of the second-moment chain, the top-left ``n_out`` block of it.

    Args:
        S: (B, M, M), ``S_l`` (only ``S[:, :n, :n]`` is read; M >= n).
        attn: (B, H, n, N), block l's attention probabilities on its n kept rows.
        n_out: rows/columns of ``S_{l-1}`` to produce (N for all of it).

    Returns:
        (B, n_out, n_out): ``Σ_h P_h[:, :n_out]ᵀ S[:n, :n] P_h[:, :n_out]``.
    """
    return torch.ops.patchslim.score_chain_step(S, attn, n_out)


def score_factor_step(F: Tensor, attn: Tensor, n_out: int) -> Tensor:
    """The chain step on a factor ``S_l = Fᵀ F``: (B, R, M) -> (B, H·R, n_out)."""
    return torch.ops.patchslim.score_factor_step(F, attn, n_out)


def score_chain_diagonal(state: Tensor, attn: Tensor, factored: bool) -> Tensor:
    """``diag(S_{l-1})`` over all N tokens, (B, N), without forming ``S_{l-1}``.

    ``state`` is ``S_l`` (B, M, M) or, with ``factored``, its factor (B, R, M).
    """
    return torch.ops.patchslim.score_chain_diagonal(state, attn, factored)


def patch_scores(s_diag: Tensor, attn: Tensor, z_in: Tensor) -> Tensor:
    """Eq. 13 per image: ``s_diag[i] · Σ_h ‖(P_h |Z|)[i, :]‖²``.

    Args:
        s_diag: (B, N), ``diag(S_t)``.
        attn: (B, H, N, N), block t's attention probabilities.
        z_in: (B, N, C), block t's input ``Z_{t-1}``.

    Returns:
        (B, N) scores.
    """
    return torch.ops.patchslim.patch_scores(s_diag, attn, z_in)
