"""The Tokens-to-Token (T2T) module of T2T-ViT, in plain PyTorch.

A T2T-ViT replaces ViT's one-shot patch embedding with three overlapping "soft splits"
(``nn.Unfold``) and two small token layers between them: the image becomes 56×56 tokens
(7×7 windows, stride 4), a token layer mixes them and shrinks each to ``token_dim``
channels, the map is re-split into 28×28 tokens of 3×3 neighbourhoods, a second token
layer mixes those, and a last 3×3 split gives the 14×14 tokens that ``project`` maps to
``embed_dim`` (Yuan et al., "Tokens-to-Token ViT", ICCV 2021).

Module and parameter names follow the official code (``yitu-opensource/T2T-ViT``,
``models/t2t_vit.py``, ``token_performer.py``, ``token_transformer.py``), so a model that
holds :class:`TokensToToken` as ``self.tokens_to_token`` loads the official checkpoints'
``tokens_to_token.*`` entries with ``strict=True``. The maths is the official one, and
in float32 so are the results up to rounding (the soft splits' feature order and the
performer's arithmetic are arranged for speed; comments say where). Where the official
code does something unusual, a comment says so too.

This file imports only torch, so it can be used (and tested) on its own.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

TOKENS_TYPES = ("performer", "transformer")

# (kernel, stride, padding) of soft_split0, soft_split1 and soft_split2.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))

# Eager forwards of TokensToToken on the CPU take at most this many first-layer tokens at
# a time (four 224×224 images); see TokensToToken.forward.
TOKENS_PER_CHUNK = 4 * 56 * 56


def sinusoid_position_table(num_positions: int, dim: int) -> Tensor:
    """The fixed sinusoid position table of T2T-ViT (official ``get_sinusoid_encoding``).

    ``table[0, p, j] = sin(p / 10000^(2*(j//2)/dim))`` for even ``j`` and ``cos`` of the
    same angle for odd ``j``: column pairs (2i, 2i+1) share one frequency. Computed in
    float64 and rounded to float32, as the official numpy code does.

    Returns:
        float32 tensor of shape (1, num_positions, dim).
    """
    if num_positions < 1 or dim < 1:
        raise ValueError(f"num_positions and dim must be positive, got {num_positions}, {dim}")
    position = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)  # (N, 1)
    pair = torch.div(torch.arange(dim), 2, rounding_mode="floor").to(torch.float64)  # (dim,)
    angle = position / torch.pow(10000.0, 2.0 * pair / dim)  # (N, dim)
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32).unsqueeze(0)


def _split_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def soft_split(x: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """The windows of ``nn.Unfold`` as tokens, window-major: (B, H, W, C) -> (B, rows·cols,
    kernel²·C).

    The zero-padded kernel × kernel windows, row-major, each flattened *window-major*
    (feature ``(i·kernel + j)·C + c``), so that ``soft_split(images.permute(0, 2, 3, 1),
    …)`` equals ``nn.Unfold(…)(images).transpose(1, 2)`` with its features (Unfold's
    channel-major ``c·kernel² + i·kernel + j``) reordered. ``x`` may be any view (the
    channels-last view of an image, or tokens viewed as their grid). The window-major
    order makes the gather copy runs of C contiguous channels: with C = 64 at batch 1 it
    is ~10× faster than Unfold's order (whose innermost runs are ``kernel`` elements C
    apart). Layers that take these features reorder their official, channel-major
    parameters with :func:`window_major` instead.
    """
    batch, height, width, channels = x.shape
    padded = nn.functional.pad(x, (0, 0, padding, padding, padding, padding))
    rows = _split_size(height, kernel, stride, padding)
    cols = _split_size(width, kernel, stride, padding)
    batch_stride, row_stride, col_stride, channel_stride = padded.stride()
    windows = padded.as_strided(
        (batch, rows, cols, kernel, kernel, channels),
        (batch_stride, stride * row_stride, stride * col_stride, row_stride, col_stride,
         channel_stride),
    )  # fmt: skip
    return windows.reshape(batch, rows * cols, kernel * kernel * channels)


def window_major(parameter: Tensor, channels: int) -> Tensor:
    """Reorder the last dimension of a parameter over soft-split features from Unfold's
    channel-major order (``c·kernel² + p``) to :func:`soft_split`'s window-major order
    (``p·channels + c``): a LayerNorm's (F,) weight or bias, a Linear's (out, F) weight.

    A copy (differentiable), ~20 µs for a (192, 576) weight at batch 1: far less than
    gathering the features in channel-major order.
    """
    return parameter.unflatten(-1, (channels, -1)).transpose(-1, -2).flatten(-2)


def _norm_then_linear(
    x: Tensor, norm: nn.LayerNorm, linear: nn.Linear, window_channels: int | None
) -> Tensor:
    """``linear(norm(x))``, where ``x`` may hold window-major soft-split features of
    ``window_channels`` channels and the two modules keep the official channel-major
    order: both are applied with their parameters reordered to x's."""
    if window_channels is None:
        return linear(norm(x))
    weight, bias = (window_major(p, window_channels) for p in (norm.weight, norm.bias))
    normed = nn.functional.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
    return nn.functional.linear(normed, window_major(linear.weight, window_channels), linear.bias)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class TokenPerformer(nn.Module):
    """Performer token layer (official ``Token_performer``, one head).

    Linear attention with positive random features of the softmax kernel, then an MLP::

        k, q, v = split(kqv(norm1(x)))                      # official order: k, q, v
        phi(u)  = exp(w·u - |u|²/2) / sqrt(m)               # (T, m) random features
        y       = v + proj(phi(q) (phi(k)ᵀ v) / (phi(q) Σ_t phi(k)_t + epsilon))
        out     = y + mlp(norm2(y))

    Args:
        dim: input channels (in_chans·7·7 or token_dim·3·3).
        in_dim: output channels ``emb`` (token_dim).
        kernel_ratio: m = int(in_dim · kernel_ratio) random features.
        dp1, dp2: dropout after ``proj`` and at the end of ``mlp`` (official 0.1; the
            official T2T module keeps these defaults, so they act in training).
        window_channels: if set, inputs are :func:`soft_split`'s window-major features of
            this many channels (``norm1`` and ``kqv`` keep the official order).

    Shapes: (B, T, dim) -> (B, T, in_dim).
    """

    def __init__(
        self,
        dim: int,
        in_dim: int,
        kernel_ratio: float = 0.5,
        dp1: float = 0.1,
        dp2: float = 0.1,
        window_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.window_channels = window_channels
        self.emb = in_dim
        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.norm1 = nn.LayerNorm(dim)  # official: nn.LayerNorm default, eps 1e-5
        self.norm2 = nn.LayerNorm(self.emb)
        self.epsilon = 1e-8  # official: keeps the normaliser's division finite
        # A Sequential, as in the official code: its keys are mlp.0.* and mlp.2.*.
        self.mlp = nn.Sequential(
            nn.Linear(self.emb, self.emb),
            nn.GELU(),  # exact (erf) GELU
            nn.Linear(self.emb, self.emb),
            nn.Dropout(dp2),
        )
        self.m = int(self.emb * kernel_ratio)
        # A fixed random projection that is nonetheless a Parameter (requires_grad=False),
        # as in the official code: it is saved in checkpoints as `w` and must load from
        # them, since outputs depend on the particular draw.
        self.w = nn.Parameter(torch.empty(self.m, self.emb), requires_grad=False)
        self.reset_random_features()

    @torch.no_grad()
    def reset_random_features(self) -> None:
        """Draw ``w`` (m, emb) as the official code does: orthogonal rows times sqrt(m).

        The scale is sqrt(m), not the sqrt(emb) of Gaussian-norm features, so the features
        estimate the softmax kernel only approximately; the trained model depends on this
        draw, which the checkpoints carry.
        """
        nn.init.orthogonal_(self.w)
        self.w.mul_(math.sqrt(self.m))

    def prm_exp(self, x: Tensor) -> Tensor:
        """Positive random features: (..., emb) -> (..., m).

        exp(w·x - |x|²/2) / sqrt(m), so that E_w[phi(x)·phi(y)] ∝ exp(x·y): the softmax
        kernel without the usual 1/sqrt(d) temperature (none is applied to q and k).
        """
        # As exp(w·x - (|x|²/2 + log √m)), the subtraction done by the GEMM and the exp in
        # place: the (..., m) features take two passes instead of four.
        offset = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / 2
        offset = offset + math.log(math.sqrt(self.m))  # (..., 1)
        rows = x.reshape(-1, x.shape[-1])
        wtx = torch.addmm(offset.reshape(-1, 1), rows, self.w.to(x.dtype).t(), beta=-1)
        return wtx.exp_().view(*x.shape[:-1], self.m)

    def attend(self, kqv: Tensor) -> Tensor:
        """The official ``single_attn`` after its ``kqv`` projection: attention with the
        skip taken from ``v``, (B, T, 3·emb) -> (B, T, emb)."""
        v = kqv[..., 2 * self.emb :]  # official order: k, q, v
        # The official code casts to float32 here (`x.float()`): exp of a difference of
        # large terms overflows or cancels in half precision. We go further and keep
        # autocast off for the feature map and the two products, so the float32 path
        # holds under AMP too; in float32 the result is the official one up to rounding.
        dtype = torch.promote_types(v.dtype, torch.float32)
        with _no_autocast(kqv.device):
            # One cast of the contiguous projections, not three of strided slices.
            k, q, v_float = kqv.to(dtype).split(self.emb, dim=-1)
            kp, qp = self.prm_exp(k), self.prm_exp(q)  # (B, T, m)
            normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, 1)
            kptv = v_float.transpose(1, 2) @ kp  # (B, emb, m)
            y = (qp @ kptv.transpose(1, 2)) / (normaliser + self.epsilon)  # (B, T, emb)
        # The input and output widths differ (dim vs emb), so the residual is `v`.
        return v + self.dp(self.proj(y.to(v.dtype)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, dim) -> (B, T, emb)."""
        x = self.attend(_norm_then_linear(x, self.norm1, self.kqv, self.window_channels))
        return x + self.mlp(self.norm2(x))


class TokenAttention(nn.Module):
    """Single-head attention of the transformer token layer (official ``Attention`` of
    ``token_transformer.py``): (B, T, dim) -> (B, T, in_dim), skip connection from ``v``.

    The official class only works with one head (its ``qkv`` has 3·in_dim outputs), which
    is what the T2T module uses; ``qkv`` has no bias.
    """

    def __init__(self, dim: int, in_dim: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = 1
        self.in_dim = in_dim
        # Official `head_dim ** -0.5` with head_dim = dim // num_heads = dim: the scale
        # comes from the *input* width (147 or 576 in T2T-ViT-14), not from the q/k width
        # in_dim (64). The T2T module passes no qk_scale, so this always holds.
        self.scale = dim**-0.5
        self.qkv = nn.Linear(dim, 3 * in_dim, bias=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, dim) -> (B, T, in_dim)."""
        return self.attend(self.qkv(x))

    def attend(self, qkv: Tensor) -> Tensor:
        """Attention from the ``qkv`` projection: (B, T, 3·in_dim) -> (B, T, in_dim)."""
        q, k, v = torch.split(qkv, self.in_dim, dim=-1)  # official order: q, k, v
        attn = ((q * self.scale) @ k.transpose(1, 2)).softmax(dim=-1)  # (B, T, T)
        y = self.proj_drop(self.proj(self.attn_drop(attn) @ v))
        return v + y


class TokenMlp(nn.Module):
    """The official (timm-style) ``Mlp``: fc1, exact GELU, fc2, dropout after each."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., in_features)."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TokenTransformer(nn.Module):
    """Transformer token layer (official ``Token_transformer``, one head, mlp_ratio 1).

    ``y = attn(norm1(x))`` (whose residual is ``v``: the widths differ), then
    ``y + mlp(norm2(y))``. Shapes: (B, T, dim) -> (B, T, in_dim). ``window_channels`` as
    for :class:`TokenPerformer`.
    """

    def __init__(
        self, dim: int, in_dim: int, mlp_ratio: float = 1.0, window_channels: int | None = None
    ) -> None:
        super().__init__()
        self.window_channels = window_channels
        self.norm1 = nn.LayerNorm(dim)  # official: nn.LayerNorm default, eps 1e-5
        self.attn = TokenAttention(dim, in_dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = TokenMlp(in_dim, int(in_dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, dim) -> (B, T, in_dim)."""
        qkv = _norm_then_linear(x, self.norm1, self.attn.qkv, self.window_channels)
        x = self.attn.attend(qkv)
        return x + self.mlp(self.norm2(x))


class TokensToToken(nn.Module):
    """The T2T module (official ``T2T_module``): images to ``num_patches`` tokens.

    Args:
        img_size: the training resolution; only sets ``num_patches``.
        tokens_type: ``"performer"`` (T2T-ViT-14) or ``"transformer"`` (T2T-ViT_t-14).
        in_chans: image channels.
        embed_dim: output width (384 for T2T-ViT-14).
        token_dim: width of the two token layers (64).

    Shapes: images (B, in_chans, H, W) -> tokens (B, N, embed_dim), where
    N = ``num_patches`` = (img_size // 16)² when H = W = img_size is a multiple of 16
    (224 -> 56×56 -> 28×28 -> 14×14 = 196 tokens). Other sizes give the grid of
    :meth:`grid_sizes`; unlike the official code (which takes square roots), non-square
    images are handled.

    The official ``T2T_ViT`` re-initialises every Linear (truncated normal, std 0.02,
    zero bias) after building this module; that is the holder's job, and ``w`` is not
    affected by it. Checkpoint loading overwrites all of it anyway.
    """

    def __init__(
        self,
        img_size: int = 224,
        tokens_type: str = "performer",
        in_chans: int = 3,
        embed_dim: int = 384,
        token_dim: int = 64,
    ) -> None:
        super().__init__()
        if tokens_type not in TOKENS_TYPES:
            raise ValueError(
                f"tokens_type must be one of {', '.join(map(repr, TOKENS_TYPES))}; "
                f"got {tokens_type!r}"
            )
        self.tokens_type = tokens_type
        self.in_chans = in_chans
        # The official soft_split0-2 are nn.Unfold modules (no parameters): here
        # soft_split with the geometry of SOFT_SPLITS, token-major and window-major; the
        # layers that take its features reorder their (official, channel-major:
        # c·k·k + row·k + col) parameters to match.
        (k0, s0, _), (k1, s1, _), (k2, s2, _) = SOFT_SPLITS
        dim1, dim2 = in_chans * k0 * k0, token_dim * k1 * k1
        self.token_dim = token_dim
        self.attention1: nn.Module
        self.attention2: nn.Module
        if tokens_type == "performer":
            self.attention1 = TokenPerformer(
                dim1, token_dim, kernel_ratio=0.5, window_channels=in_chans
            )
            self.attention2 = TokenPerformer(
                dim2, token_dim, kernel_ratio=0.5, window_channels=token_dim
            )
        else:
            self.attention1 = TokenTransformer(
                dim1, token_dim, mlp_ratio=1.0, window_channels=in_chans
            )
            self.attention2 = TokenTransformer(
                dim2, token_dim, mlp_ratio=1.0, window_channels=token_dim
            )
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim)
        stride = s0 * s1 * s2
        self.num_patches = (img_size // stride) * (img_size // stride)

    @staticmethod
    def grid_sizes(height: int, width: int) -> tuple[tuple[int, int], ...]:
        """Token grids (rows, cols) after soft_split0, soft_split1 and soft_split2."""
        grids = []
        for kernel, stride, padding in SOFT_SPLITS:
            height = _split_size(height, kernel, stride, padding)
            width = _split_size(width, kernel, stride, padding)
            grids.append((height, width))
        return tuple(grids)

    def forward(self, images: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, N, embed_dim); N = 196 for 224×224 images."""
        # (Skipped under torch.jit.trace, e.g. fvcore's, where shapes are traced values.)
        if not torch.jit.is_tracing() and (images.dim() != 4 or images.shape[1] != self.in_chans):
            raise ValueError(
                f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(images.shape)}"
            )
        # A few images at a time on the CPU: at batch 32 the first layers' tensors (29–77
        # MB each at 224×224) pass glibc malloc's largest mmap threshold, so each call maps
        # them afresh and page-faults them in (1.4–1.6× the module's time on our CPU;
        # docs/design.md §11). Elsewhere the whole batch: CUDA's caching allocator keeps
        # its blocks, and chunks would multiply the kernel launches (64 rounds of small
        # kernels at batch 256; T2T-ViT-14 took ten times DeiT-S's time on an H200 with
        # them, not yet measured without). Traced,
        # compiled and exported graphs take the whole batch too, so that their batch size
        # can stay dynamic.
        if (
            images.device.type == "cpu"
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        ):
            (h0, w0), _, _ = self.grid_sizes(images.shape[2], images.shape[3])
            per_chunk = max(1, TOKENS_PER_CHUNK // (h0 * w0))
            if images.shape[0] > per_chunk:
                return torch.cat([self._tokens(chunk) for chunk in images.split(per_chunk)])
        return self._tokens(images)

    def _tokens(self, images: Tensor) -> Tensor:
        """forward on one chunk of images."""
        batch = images.shape[0]
        (h0, w0), (h1, w1), _ = self.grid_sizes(images.shape[2], images.shape[3])
        split0, split1, split2 = SOFT_SPLITS
        x = soft_split(images.permute(0, 2, 3, 1), *split0)  # (B, h0·w0, in_chans·49)
        x = self.attention1(x)  # (B, h0·w0, token_dim)
        x = soft_split(x.reshape(batch, h0, w0, -1), *split1)  # (B, h1·w1, token_dim·9)
        x = self.attention2(x)  # (B, h1·w1, token_dim)
        x = soft_split(x.reshape(batch, h1, w1, -1), *split2)  # (B, h2·w2, token_dim·9)
        weight = window_major(self.project.weight, self.token_dim)
        return nn.functional.linear(x, weight, self.project.bias)  # (B, h2·w2, embed_dim)
