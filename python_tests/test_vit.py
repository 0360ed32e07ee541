"""VisionTransformer against a plain-torch reference forward, and its factories.

Conversion from real timm models is tested in test_timm.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_parameters

import patchslim_ext as ps
from patchslim_ext.vit import VisionTransformer, ViTConfig


def reference_forward(
    state: dict[str, torch.Tensor],
    config: ViTConfig,
    images: torch.Tensor,
    patches: torch.Tensor | None = None,
):
    """ViT forward written out with plain torch ops, straight from the paper's Eq. 1.

    ``patches`` (B, P, C): the embedded patches, if not a plain patch embedding (T2T).
    """
    p, dim, heads = config.patch_size, config.embed_dim, config.num_heads
    batch = images.shape[0]
    if patches is None:
        # Patches as rows, then a matrix product: the convolution written out.
        rows = images.unfold(2, p, p).unfold(3, p, p)  # (B, in, g, g, p, p)
        rows = rows.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, config.in_chans * p * p)
        patches = rows @ state["patch_embed.proj.weight"].reshape(dim, -1).T
        patches = patches + state["patch_embed.proj.bias"]
    x = torch.cat([state["cls_token"].expand(batch, 1, dim), patches], 1) + state["pos_embed"]

    def norm(t, prefix):
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        return (t - mean) / torch.sqrt(var + config.norm_eps) * state[f"{prefix}.weight"] + state[
            f"{prefix}.bias"
        ]

    def linear(t, prefix):
        return t @ state[f"{prefix}.weight"].T + state.get(f"{prefix}.bias", 0.0)

    tokens = x.shape[1]
    for i in range(config.depth):
        b = f"blocks.{i}"
        q, k, v = linear(norm(x, f"{b}.norm1"), f"{b}.attn.qkv").chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, tokens, heads, -1).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(config.head_dim) if config.attn_scale is None else config.attn_scale
        attn = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        x = x + linear((attn @ v).transpose(1, 2).reshape(batch, tokens, dim), f"{b}.attn.proj")
        hidden = linear(norm(x, f"{b}.norm2"), f"{b}.mlp.fc1")
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        x = x + linear(hidden, f"{b}.mlp.fc2")
    return linear(norm(x, "norm")[:, 0], "head")


CONFIGS = [
    ViTConfig(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=2, num_heads=3
    ),
    ViTConfig(
        img_size=32,
        patch_size=8,
        in_chans=3,
        num_classes=7,
        embed_dim=64,
        depth=3,
        num_heads=4,
        mlp_ratio=2.0,
    ),
    ViTConfig(
        img_size=48,
        patch_size=16,
        in_chans=3,
        num_classes=1000,
        embed_dim=192,
        depth=1,
        num_heads=3,
    ),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.img_size}px-C{c.embed_dim}")
@pytest.mark.parametrize("batch", [1, 7])
def test_forward_matches_reference(config, batch):
    model = VisionTransformer.from_config(config).eval()
    randomise_parameters(model, seed=batch)
    images = torch.randn(batch, config.in_chans, config.img_size, config.img_size)
    with torch.no_grad():
        logits = model(images)
        ref = reference_forward(model.state_dict(), config, images)
    assert logits.shape == (batch, config.num_classes)
    assert (logits - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_forward_features_is_timm_forward_features():
    model = ps.digits_vit().eval()
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        features = model.forward_features(images)
        torch.testing.assert_close(model.head(features[:, 0]), model(images))


def test_factories_have_deit_shapes():
    expected = {
        ps.deit_tiny_patch16_224: (192, 3, 5_717_416),
        ps.deit_small_patch16_224: (384, 6, 22_050_664),
        ps.deit_base_patch16_224: (768, 12, 86_567_656),
    }
    for factory, (dim, heads, params) in expected.items():
        model = factory()
        assert model.config.embed_dim == dim and model.config.num_heads == heads
        assert model.config.num_tokens == 197
        # timm's parameter counts for the 1000-class models.
        assert sum(p.numel() for p in model.parameters()) == params
    small = ps.deit_tiny_patch16_224(num_classes=5, img_size=64, patch_size=8, in_chans=1)
    assert ps.deit_small_distilled_patch16_224().config.num_head_tokens == 2
    assert ps.deit3_small_patch16_224().pos_embed.shape == (1, 196, 384)
    assert small.config.num_tokens == 65 and small.head.out_features == 5


def test_digits_model_has_at_least_50_tokens():
    config = ps.digits_vit().config
    assert config.depth == 12 and config.num_tokens >= 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"img_size": 30, "patch_size": 4}, "not a multiple of patch_size"),
        ({"embed_dim": 100, "num_heads": 3}, "not divisible by num_heads"),
        ({"depth": 0}, r"depth must be in \[1, 1024\], got 0"),
        ({"depth": 10**6}, r"depth must be in \[1, 1024\], got 1000000"),
        ({"num_heads": True}, "num_heads must be an int, got True"),
        ({"depth": 12.0}, "depth must be an int, got 12.0"),
        ({"embed_dim": "768"}, "embed_dim must be an int"),
        ({"qkv_bias": 1}, "qkv_bias must be a bool"),
        ({"mlp_ratio": float("nan")}, "mlp_ratio must be positive and finite"),
        ({"embed": "conv"}, "embed must be one of"),
        ({"embed": "t2t_performer", "patch_size": 8}, "reduces images by 16"),
        ({"distilled": True, "reg_tokens": 2}, "not a known layout"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        ViTConfig.from_dict({**ViTConfig().to_dict(), **kwargs})


def test_config_from_dict_refuses_unknown_fields_and_non_objects():
    with pytest.raises(ValueError, match=r"unknown ViTConfig field\(s\): \['heads'\]"):
        ViTConfig.from_dict({"heads": 3})
    with pytest.raises(ValueError, match="must be a JSON object"):
        ViTConfig.from_dict([1, 2])


@pytest.mark.parametrize("factory", [ps.t2t_vit_14, ps.t2t_vit_t_14])
def test_t2t_vit_14_backbone_matches_the_official_numerics(factory):
    """No qkv bias, logits scaled by 384 ** -0.5, LayerNorm eps 1e-5, sinusoid positions,
    21.5M trainable parameters (the T2T-ViT paper's figure)."""
    model = factory(num_classes=7).eval()
    config = model.config
    assert (config.embed_dim, config.depth, config.num_heads, config.mlp_ratio) == (384, 14, 6, 3)
    assert config.num_tokens == 197 and not model.pos_embed.requires_grad
    trainable = sum(p.numel() for p in factory().parameters() if p.requires_grad)
    assert round(trainable / 1e6, 1) == 21.5
    assert not any(key.endswith("attn.qkv.bias") for key in model.state_dict())
    randomise_parameters(model.blocks, seed=1)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        patches = model.tokens_to_token(images)
        ref = reference_forward(model.state_dict(), config, images, patches)
        torch.testing.assert_close(model(images), ref, rtol=1e-4, atol=1e-5)


def test_wrong_image_size_is_refused():
    with pytest.raises(ValueError, match=r"expected images of size \(28, 28\)"):
        ps.digits_vit()(torch.randn(1, 1, 32, 32))


def test_backward_through_model():
    model = ps.digits_vit()
    images = torch.randn(3, 1, 28, 28)
    F.cross_entropy(model(images), torch.tensor([1, 2, 3])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.norm.weight.grad.abs().sum() > 0
