"""A pre-norm ViT/DeiT whose parameter names and numerics match timm's ``VisionTransformer``.

Official DeiT checkpoints (a ``.pth`` whose ``"model"`` entry is a timm state
dict) load with ``strict=True``; see :mod:`patchslim_ext.checkpoint`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchslim_ext.ops import prefix_layer_norm

LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT/DeiT, in timm's constructor arguments."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in (
            "img_size",
            "patch_size",
            "in_chans",
            "num_classes",
            "embed_dim",
            "depth",
            "num_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """N: patches plus the class token."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s): {sorted(unknown)}")
        return cls(**values)


class PrefixLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that can normalise only the first ``n_rows`` tokens.

    ``norm(x)`` normalises every token; ``norm(x, n_rows)`` maps (B, N, C) to
    (B, n_rows, C) through ``patchslim::prefix_layer_norm``, without copying the slice.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor, n_rows: int | None = None) -> Tensor:
        if n_rows is None:
            return super().forward(x)
        return prefix_layer_norm(x, n_rows, self.weight, self.bias, self.eps)


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
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, channels))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN1(x))``, then ``x + MLP(LN2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT/DeiT with class-token pooling, state-dict compatible with timm.

    Input: (B, in_chans, img_size, img_size) images. Output: (B, num_classes) logits.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.config = ViTConfig(
            img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio
        )
        cfg = self.config
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, embed_dim))
        self.blocks = nn.Sequential(
            *(Block(embed_dim, num_heads, cfg.mlp_hidden) for _ in range(depth))
        )
        self.norm = PrefixLayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: ViTConfig) -> VisionTransformer:
        return cls(**config.to_dict())

    def reset_parameters(self) -> None:
        """timm's initialisation: truncated normal (std 0.02) weights, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, images: Tensor) -> Tensor:
        """(B, in_chans, H, W) images to (B, N, C) tokens, class token first."""
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat((cls, patches), dim=1) + self.pos_embed

    def forward_tokens(self, images: Tensor) -> Tensor:
        """(B, N, C) tokens after the last block, before the final norm."""
        return self.blocks(self.embed(images))

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, N, C) normalised tokens, as timm's ``forward_features``."""
        return self.norm(self.forward_tokens(images))

    def forward_head(self, tokens: Tensor) -> Tensor:
        """(B, N, C) tokens before the final norm to (B, num_classes) logits.

        Only the class token is classified, so only its row is normalised.
        """
        return self.head(self.norm(tokens, n_rows=1)[:, 0])

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_tokens(images))


def _factory(config: ViTConfig) -> VisionTransformer:
    return VisionTransformer.from_config(config)


def deit_tiny_patch16_224(
    num_classes: int = 1000, img_size: int = 224, patch_size: int = 16, in_chans: int = 3
) -> VisionTransformer:
    """DeiT-Ti: C=192, 12 blocks, 3 heads (5.7M parameters at 224)."""
    return _factory(ViTConfig(img_size, patch_size, in_chans, num_classes, 192, 12, 3))


def deit_small_patch16_224(
    num_classes: int = 1000, img_size: int = 224, patch_size: int = 16, in_chans: int = 3
) -> VisionTransformer:
    """DeiT-S: C=384, 12 blocks, 6 heads (22M parameters at 224)."""
    return _factory(ViTConfig(img_size, patch_size, in_chans, num_classes, 384, 12, 6))


def deit_base_patch16_224(
    num_classes: int = 1000, img_size: int = 224, patch_size: int = 16, in_chans: int = 3
) -> VisionTransformer:
    """DeiT-B: C=768, 12 blocks, 12 heads (86M parameters at 224)."""
    return _factory(ViTConfig(img_size, patch_size, in_chans, num_classes, 768, 12, 12))


def digits_vit(
    num_classes: int = 10, img_size: int = 28, patch_size: int = 4, in_chans: int = 1
) -> VisionTransformer:
    """The demo model: a DeiT-style ViT for 28×28 digits (12 blocks, C=96, 3 heads, 50 tokens)."""
    return _factory(ViTConfig(img_size, patch_size, in_chans, num_classes, 96, 12, 3))


MODEL_FACTORIES = {
    "digits_vit": digits_vit,
    "deit_tiny_patch16_224": deit_tiny_patch16_224,
    "deit_small_patch16_224": deit_small_patch16_224,
    "deit_base_patch16_224": deit_base_patch16_224,
}


def from_timm(module: nn.Module) -> VisionTransformer:
    """Convert a timm ``VisionTransformer`` instance (duck-typed; timm is not imported).

    Supported: class-token pooling, one prefix token, absolute position embedding
    including the class token, LayerNorm(eps=1e-6), exact GELU, biased qkv, no
    layer scale, no qk-norm. Anything else is refused with a ``ValueError``
    naming what differs.
    """
    for name in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "head"):
        if not hasattr(module, name):
            raise ValueError(f"not a timm VisionTransformer: it has no attribute '{name}'")
    if getattr(module, "dist_token", None) is not None:
        raise ValueError("distilled DeiT (dist_token) is not supported")
    if getattr(module, "num_prefix_tokens", 1) != 1:
        raise ValueError(f"expected one prefix token, got {module.num_prefix_tokens}")
    if getattr(module, "global_pool", "token") != "token":
        raise ValueError(f"expected global_pool='token', got {module.global_pool!r}")
    if getattr(module, "no_embed_class", False):
        raise ValueError("no_embed_class=True is not supported")
    if not isinstance(module.head, nn.Linear):
        raise ValueError(f"expected a Linear head, got {type(module.head).__name__}")
    first = module.blocks[0]
    act = first.mlp.act
    if type(act).__name__ != "GELU" or getattr(act, "approximate", "none") != "none":
        raise ValueError(f"expected exact GELU in the MLP, got {act!r}")
    for name, norm in (("norm", module.norm), ("blocks.0.norm1", first.norm1)):
        if not isinstance(norm, nn.LayerNorm) or norm.eps != LAYER_NORM_EPS:
            raise ValueError(f"expected {name} to be LayerNorm(eps={LAYER_NORM_EPS}), got {norm!r}")

    proj = module.patch_embed.proj
    embed_dim = module.cls_token.shape[-1]
    patch_size = proj.kernel_size[0]
    grid = math.isqrt(module.pos_embed.shape[1] - 1)
    config = ViTConfig(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=proj.in_channels,
        num_classes=module.head.out_features,
        embed_dim=embed_dim,
        depth=len(module.blocks),
        num_heads=first.attn.num_heads,
        mlp_ratio=first.mlp.fc1.out_features / embed_dim,
    )
    from patchslim_ext.checkpoint import load_state_dict_strict

    model = VisionTransformer.from_config(config)
    load_state_dict_strict(model, module.state_dict())
    return model.to(module.cls_token.device, module.cls_token.dtype)
