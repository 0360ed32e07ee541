"""VisionTransformer against a plain-torch reference forward, factories and from_timm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_parameters
from torch import nn

import patchslim_ext as ps
from patchslim_ext.checkpoint import CheckpointError
from patchslim_ext.vit import VisionTransformer, ViTConfig


def reference_forward(state: dict[str, torch.Tensor], config: ViTConfig, images: torch.Tensor):
    """ViT forward written out with plain torch ops, straight from the paper's Eq. 1."""
    p, dim, heads = config.patch_size, config.embed_dim, config.num_heads
    batch = images.shape[0]
    # Patches as rows, then a matrix product: the convolution written out.
    patches = images.unfold(2, p, p).unfold(3, p, p)  # (B, in, g, g, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, config.in_chans * p * p)
    x = patches @ state["patch_embed.proj.weight"].reshape(dim, -1).T
    x = x + state["patch_embed.proj.bias"]
    x = torch.cat([state["cls_token"].expand(batch, 1, dim), x], 1) + state["pos_embed"]

    def norm(t, prefix):
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-6) * state[f"{prefix}.weight"] + state[
            f"{prefix}.bias"
        ]

    def linear(t, prefix):
        return t @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]

    tokens = x.shape[1]
    for i in range(config.depth):
        b = f"blocks.{i}"
        q, k, v = linear(norm(x, f"{b}.norm1"), f"{b}.attn.qkv").chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, tokens, heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(config.head_dim), dim=-1)
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
    assert small.config.num_tokens == 65 and small.head.out_features == 5


def test_digits_model_has_at_least_50_tokens():
    config = ps.digits_vit().config
    assert config.depth == 12 and config.num_tokens >= 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"img_size": 30, "patch_size": 4}, "not a multiple of patch_size"),
        ({"embed_dim": 100, "num_heads": 3}, "not divisible by num_heads"),
        ({"depth": 0}, "depth must be a positive int"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**kwargs)


def test_wrong_image_size_is_refused():
    with pytest.raises(ValueError, match=r"expected images of size \(28, 28\)"):
        ps.digits_vit()(torch.randn(1, 1, 32, 32))


# timm-like modules, duck-typed the way from_timm reads them.
class _TimmAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)


class _TimmBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _TimmAttention(dim, heads)
        self.ls1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(hidden, dim)


class _TimmViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.num_prefix_tokens = 1
        self.global_pool = "token"
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(
            config.in_chans, config.embed_dim, config.patch_size, config.patch_size
        )
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, config.num_tokens, config.embed_dim))
        self.blocks = nn.Sequential(
            *(
                _TimmBlock(config.embed_dim, config.num_heads, config.mlp_hidden)
                for _ in range(config.depth)
            )
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.fc_norm = nn.Identity()
        self.head = nn.Linear(config.embed_dim, config.num_classes)


def test_from_timm_converts_and_matches():
    config = CONFIGS[1]
    timm_like = _TimmViT(config)
    randomise_parameters(timm_like, seed=3)
    model = ps.from_timm(timm_like)
    assert model.config == config
    for key, value in timm_like.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_from_timm_refuses_what_it_cannot_represent():
    config = CONFIGS[0]
    distilled = _TimmViT(config)
    distilled.dist_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
    with pytest.raises(ValueError, match="dist_token"):
        ps.from_timm(distilled)
    pooled = _TimmViT(config)
    pooled.global_pool = "avg"
    with pytest.raises(ValueError, match="global_pool='token'"):
        ps.from_timm(pooled)
    tanh_gelu = _TimmViT(config)
    tanh_gelu.blocks[0].mlp.act = nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="exact GELU"):
        ps.from_timm(tanh_gelu)
    layer_scale = _TimmViT(config)
    layer_scale.blocks[1].ls1 = nn.Module()
    layer_scale.blocks[1].ls1.gamma = nn.Parameter(torch.ones(config.embed_dim))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): blocks.1.ls1.gamma"):
        ps.from_timm(layer_scale)
    with pytest.raises(ValueError, match="no attribute 'patch_embed'"):
        ps.from_timm(nn.Linear(2, 2))


def test_backward_through_model():
    model = ps.digits_vit()
    images = torch.randn(3, 1, 28, 28)
    F.cross_entropy(model(images), torch.tensor([1, 2, 3])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.norm.weight.grad.abs().sum() > 0
