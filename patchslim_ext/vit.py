"""Pre-norm ViTs whose parameter names and numerics match timm's and the T2T-ViT release.

One :class:`VisionTransformer` class covers the layouts users hold: DeiT (class token),
distilled DeiT (class + distillation token, two heads averaged), DeiT-III (layer scale,
position embedding without the class token), register-token ViTs, and T2T-ViT (a
tokens-to-token embedding, no qkv bias, attention scaled by ``embed_dim ** -0.5``, a
fixed sinusoid position table). Its state dict loads with ``strict=True`` into the
matching ``timm.create_model(name)`` (or the official ``T2T_ViT``), and back.

Every block runs dense, or pruned (paper Eq. 2: only a prefix of the tokens is updated)
from the same module; the model runs a :class:`~patchslim_ext.plan.SlimPlan` once one
is set (:class:`~patchslim_ext.pruning.PrunableViT`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchslim_ext.pruning import PrunableViT, pruned_block
from patchslim_ext.t2t import TokensToToken, sinusoid_position_table

LAYER_NORM_EPS = 1e-6
EMBEDDINGS = ("patch", "t2t_performer", "t2t_transformer")
POSITION_EMBEDDINGS = ("learned", "sinusoid")
# Bounds that no real ViT comes near; a checkpoint's metadata beyond them is refused
# before anything is allocated.
_MAX_SIZE = {
    "img_size": 8192,
    "patch_size": 1024,
    "in_chans": 64,
    "num_classes": 1_000_000,
    "embed_dim": 65536,
    "depth": 1024,
    "num_heads": 1024,
    "reg_tokens": 1024,
}


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT, in timm's constructor arguments.

    ``embed`` is ``"patch"`` (a strided convolution) or a T2T-ViT tokens-to-token module
    (``"t2t_performer"``, ``"t2t_transformer"``; their soft splits reduce the image by
    ``patch_size = 16``). ``attn_scale`` None means ``head_dim ** -0.5``.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    attn_scale: float | None = None
    distilled: bool = False
    reg_tokens: int = 0
    no_embed_class: bool = False
    layer_scale: bool = False
    norm_eps: float = LAYER_NORM_EPS
    embed: str = "patch"
    pos_embed: str = "learned"

    def __post_init__(self) -> None:
        for name, bound in _MAX_SIZE.items():
            value = getattr(self, name)
            low = 0 if name == "reg_tokens" else 1
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ViTConfig.{name} must be an int, got {value!r}")
            if not low <= value <= bound:
                raise ValueError(f"ViTConfig.{name} must be in [{low}, {bound}], got {value}")
        for name in ("qkv_bias", "distilled", "no_embed_class", "layer_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ViTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("mlp_ratio", "norm_eps", "attn_scale"):
            value = getattr(self, name)
            if value is None and name == "attn_scale":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"ViTConfig.{name} must be a number, got {value!r}")
            if not 0 < value < 1e6 or not math.isfinite(value):
                raise ValueError(f"ViTConfig.{name} must be positive and finite, got {value}")
        if self.embed not in EMBEDDINGS:
            raise ValueError(f"ViTConfig.embed must be one of {EMBEDDINGS}, got {self.embed!r}")
        if self.pos_embed not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"ViTConfig.pos_embed must be one of {POSITION_EMBEDDINGS}, got {self.pos_embed!r}"
            )
        if self.embed != "patch" and self.patch_size != 16:
            raise ValueError(
                f"a T2T embedding reduces images by 16, got patch_size {self.patch_size}"
            )
        if self.distilled and self.reg_tokens:
            raise ValueError("a distilled model with register tokens is not a known layout")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} leaves no hidden unit")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation, registers (timm's order)."""
        return 1 + int(self.distilled) + self.reg_tokens

    @property
    def num_head_tokens(self) -> int:
        """The tokens the classifier reads: the class token (and the distillation token)."""
        return 1 + int(self.distilled)

    @property
    def num_tokens(self) -> int:
        """N: patches plus prefix tokens."""
        return self.num_patches + self.num_prefix_tokens

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def scale(self) -> float:
        """The attention logits' scale."""
        return self.head_dim**-0.5 if self.attn_scale is None else self.attn_scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> ViTConfig:
        """The config :meth:`to_dict` wrote; fields are type-checked, unknown ones refused."""
        if not isinstance(values, dict):
            raise ValueError(f"a ViTConfig must be a JSON object, got {type(values).__name__}")
        unknown = set(values) - {field.name for field in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s): {sorted(unknown)}")
        return cls(**values)


class PatchEmbed(nn.Module):
    """(B, in_chans, H, W) images to (B, num_patches, C) patch embeddings."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != self.img_size:
            raise ValueError(
                f"expected images of size {self.img_size}, got {tuple(images.shape[-2:])}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = scale
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, channels))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """``x · γ`` per channel (DeiT-III), timm's parameter name."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm block: ``x + ls1(Attn(LN1(x)))``, then ``x + ls2(MLP(LN2(x)))``.

    ``block(x)`` is the dense block; ``block(x, n_keep)`` updates only the tokens
    ``[0, n_keep)`` of x (paper Eq. 2; the others pass through and still serve as keys
    and values), and with ``return_attention=True`` also returns the attention
    probabilities (B, H, n_keep, N).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias, config.scale)
        self.ls1 = LayerScale(dim) if config.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, config.mlp_hidden)
        self.ls2 = LayerScale(dim) if config.layer_scale else nn.Identity()

    def forward(
        self, x: Tensor, n_keep: int | None = None, *, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        if n_keep is None and not return_attention:
            x = x + self.ls1(self.attn(self.norm1(x)))
            return x + self.ls2(self.mlp(self.norm2(x)))
        return pruned_block(self, x, x.shape[1] if n_keep is None else n_keep, return_attention)


class VisionTransformer(PrunableViT, nn.Module):
    """A ViT with token pooling, state-dict compatible with timm (and T2T-ViT).

    Input: (B, in_chans, img_size, img_size) images. Output: (B, num_classes) logits
    (a distilled model averages its two heads, as timm does at inference).
    ``forward_features`` returns the normalised tokens (B, N, C) in the original token
    order and ``forward_head(tokens, pre_logits=False)`` classifies them, so that
    ``forward_head(forward_features(x)) == forward(x)``. ``set_plan(plan)`` makes the
    blocks update only the tokens the plan keeps; ``set_plan(None)`` is dense again.
    """

    def __init__(self, config: ViTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = ViTConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a ViTConfig or its fields as keyword arguments")
        self.config = config
        dim = config.embed_dim
        if config.embed == "patch":
            self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, dim)
        else:
            self.tokens_to_token = TokensToToken(
                config.img_size,
                tokens_type=config.embed.removeprefix("t2t_"),
                in_chans=config.in_chans,
                embed_dim=dim,
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if config.distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        if config.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, config.reg_tokens, dim))
        positions = config.num_patches + (0 if config.no_embed_class else config.num_prefix_tokens)
        if config.pos_embed == "sinusoid":
            # T2T-ViT keeps its fixed table as a frozen parameter, so it is in the state dict.
            table = sinusoid_position_table(positions, dim)
            self.pos_embed = nn.Parameter(table, requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, positions, dim))
        self.blocks = nn.Sequential(*(Block(config) for _ in range(config.depth)))
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.head = nn.Linear(dim, config.num_classes)
        if config.distilled:
            self.head_dist = nn.Linear(dim, config.num_classes)
        self.reset_parameters()
        self.set_plan(None)

    @classmethod
    def from_config(cls, config: ViTConfig) -> VisionTransformer:
        return cls(config)

    def reset_parameters(self) -> None:
        """timm's initialisation: truncated normal (std 0.02) weights, zero biases."""
        if self.config.pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for name in ("dist_token", "reg_token"):
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name), std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, images: Tensor) -> Tensor:
        """(B, in_chans, H, W) images to (B, N, C) tokens, prefix tokens first."""
        config = self.config
        if config.embed == "patch":
            patches = self.patch_embed(images)
        else:
            patches = self.tokens_to_token(images)
        batch = patches.shape[0]
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if config.distilled:
            prefix.append(self.dist_token.expand(batch, -1, -1))
        if config.reg_tokens:
            prefix.append(self.reg_token.expand(batch, -1, -1))
        if config.no_embed_class:
            return torch.cat((*prefix, patches + self.pos_embed), dim=1)
        return torch.cat((*prefix, patches), dim=1) + self.pos_embed

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, n, C) normalised tokens (n >= the head tokens) to (B, num_classes) logits,
        or the pooled (B, C) features with ``pre_logits=True``."""
        if not self.config.distilled:
            pooled = tokens[:, 0]
            return pooled if pre_logits else self.head(pooled)
        cls, dist = tokens[:, 0], tokens[:, 1]
        if pre_logits:
            return (cls + dist) / 2
        return (self.head(cls) + self.head_dist(dist)) / 2


def resample_position_embedding(pos_embed: Tensor, grid: int, num_prefix_tokens: int) -> Tensor:
    """A learned (1, prefix + g², C) position embedding resampled to a ``grid``² patch grid.

    The prefix rows are kept; the patch rows are resized as an image, bicubic with
    antialiasing (timm's ``resample_abs_pos_embed``), in float32.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise ValueError(f"position embedding has {patches.shape[1]} patch rows, not a square")
    if old == grid:
        return pos_embed
    channels = patches.shape[-1]
    image = patches.reshape(1, old, old, channels).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True)
    patches = image.permute(0, 2, 3, 1).reshape(1, grid * grid, channels).to(pos_embed.dtype)
    return torch.cat((prefix, patches), dim=1)


def _deit(embed_dim: int, num_heads: int, **overrides: Any) -> VisionTransformer:
    return VisionTransformer(ViTConfig(embed_dim=embed_dim, num_heads=num_heads, **overrides))


def deit_tiny_patch16_224(**overrides: Any) -> VisionTransformer:
    """DeiT-Ti: C=192, 12 blocks, 3 heads (5.7M parameters at 224)."""
    return _deit(192, 3, **overrides)


def deit_small_patch16_224(**overrides: Any) -> VisionTransformer:
    """DeiT-S: C=384, 12 blocks, 6 heads (22M parameters at 224)."""
    return _deit(384, 6, **overrides)


def deit_base_patch16_224(**overrides: Any) -> VisionTransformer:
    """DeiT-B: C=768, 12 blocks, 12 heads (86M parameters at 224)."""
    return _deit(768, 12, **overrides)


def deit_small_distilled_patch16_224(**overrides: Any) -> VisionTransformer:
    """Distilled DeiT-S: class and distillation tokens, two heads averaged."""
    return _deit(384, 6, distilled=True, **overrides)


def deit3_small_patch16_224(**overrides: Any) -> VisionTransformer:
    """DeiT-III S: layer scale, position embedding on the patches only."""
    return _deit(384, 6, layer_scale=True, no_embed_class=True, **overrides)


def _t2t_vit_14(embed: str, **overrides: Any) -> VisionTransformer:
    config = {
        "embed_dim": 384,
        "depth": 14,
        "num_heads": 6,
        "mlp_ratio": 3.0,
        "qkv_bias": False,
        # The released weights were trained with logits scaled by embed_dim ** -0.5
        # (the official factory's qk_scale for pretrained models), not head_dim ** -0.5.
        "attn_scale": 384**-0.5,
        "norm_eps": 1e-5,  # the official model uses nn.LayerNorm's default
        "embed": embed,
        "pos_embed": "sinusoid",
        **overrides,
    }
    return VisionTransformer(ViTConfig(**config))


def t2t_vit_14(**overrides: Any) -> VisionTransformer:
    """T2T-ViT-14 (performer tokens-to-token): C=384, 14 blocks, 6 heads, MLP ratio 3."""
    return _t2t_vit_14("t2t_performer", **overrides)


def t2t_vit_t_14(**overrides: Any) -> VisionTransformer:
    """T2T-ViT_t-14: T2T-ViT-14 with transformer layers in its tokens-to-token module."""
    return _t2t_vit_14("t2t_transformer", **overrides)


def digits_vit(**overrides: Any) -> VisionTransformer:
    """The demo model: a DeiT-style ViT for 28×28 digits (12 blocks, C=96, 3 heads, 50 tokens)."""
    config = {
        "img_size": 28,
        "patch_size": 4,
        "in_chans": 1,
        "num_classes": 10,
        "embed_dim": 96,
        "depth": 12,
        "num_heads": 3,
        **overrides,
    }
    return VisionTransformer(ViTConfig(**config))


MODEL_FACTORIES = {
    "digits_vit": digits_vit,
    "deit_tiny_patch16_224": deit_tiny_patch16_224,
    "deit_small_patch16_224": deit_small_patch16_224,
    "deit_base_patch16_224": deit_base_patch16_224,
    "deit_small_distilled_patch16_224": deit_small_distilled_patch16_224,
    "deit3_small_patch16_224": deit3_small_patch16_224,
    "t2t_vit_14": t2t_vit_14,
    "t2t_vit_t_14": t2t_vit_t_14,
}
