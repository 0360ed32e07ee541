"""Pruned-block ops, SlimPlan and PrunedViT against dense references with Eq. 2 masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_isas, randomise_parameters

import patchslim_ext as ps
from patchslim_ext.ops import pruned_mlp, pruned_msa
from patchslim_ext.vit import VisionTransformer, ViTConfig

CONFIG = ViTConfig(
    img_size=16, patch_size=4, in_chans=2, num_classes=5, embed_dim=24, depth=4, num_heads=3
)


def _model(dtype=torch.float32, seed=0):
    return randomise_parameters(VisionTransformer.from_config(CONFIG), seed, scale=0.3).to(dtype)


def _random_plan(config, seed):
    """A random nested plan: random order (class token first), random non-increasing counts."""
    gen = torch.Generator().manual_seed(seed)
    tokens = config.num_tokens
    order = torch.cat(
        [torch.zeros(1, dtype=torch.long), torch.randperm(tokens - 1, generator=gen) + 1]
    )
    counts = sorted(
        torch.randint(1, tokens + 1, (config.depth,), generator=gen).tolist(), reverse=True
    )
    return ps.SlimPlan(order, counts)


def masked_reference(model, plan, images, return_blocks=False):
    """Paper Eq. 2 with dense tensors, no permutation: block l computes every token and
    keeps the update only where m_l = 1 (Z' = Z + diag(m) ·)."""
    cfg = model.config
    x = model.embed(images)
    masks = plan.masks().to(x.device)
    heads = cfg.num_heads
    outputs = []
    for block, mask in zip(model.blocks, masks, strict=True):
        m = mask[None, :, None].to(x.dtype)
        h = F.layer_norm(x, (cfg.embed_dim,), block.norm1.weight, block.norm1.bias, 1e-6)
        q, k, v = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).chunk(3, -1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        attn = torch.softmax(split(q) @ split(k).mT / math.sqrt(cfg.head_dim), -1)
        update = F.linear(
            (attn @ split(v)).transpose(1, 2).flatten(2),
            block.attn.proj.weight,
            block.attn.proj.bias,
        )
        x = x + m * update
        h = F.layer_norm(x, (cfg.embed_dim,), block.norm2.weight, block.norm2.bias, 1e-6)
        x = x + m * block.mlp.fc2(F.gelu(block.mlp.fc1(h)))
        outputs.append(x)
    logits = model.head(
        F.layer_norm(x[:, 0], (cfg.embed_dim,), model.norm.weight, model.norm.bias, 1e-6)
    )
    return (logits, outputs) if return_blocks else logits


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pruned_vit_matches_masked_reference(seed, dtype):
    model = _model(dtype, seed)
    plan = _random_plan(CONFIG, seed)
    pruned = ps.PrunedViT(model, plan)
    images = torch.randn(3, 2, 16, 16, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    with torch.no_grad():
        want_logits, want_blocks = masked_reference(model, plan, images, return_blocks=True)
        x = model.embed(images)[:, plan.token_order]
        for index, block in enumerate(model.blocks):
            n = plan.keep_counts[index]
            kept, _ = pruned_msa(x, n, CONFIG.num_heads, *_msa(block))
            kept = pruned_mlp(kept, *_mlp(block))
            want = want_blocks[index][:, plan.token_order[:n]]
            assert ((kept - want).abs().max() / want.abs().max()).item() <= tol
            x = torch.cat([kept, x[:, n:]], 1)
        for logits in (pruned(images), pruned.train()(images).detach()):
            assert ((logits - want_logits).abs().max() / want_logits.abs().max()).item() <= tol


def _msa(block):
    from patchslim_ext.pruned import _msa_args

    return _msa_args(block)


def _mlp(block):
    from patchslim_ext.pruned import _mlp_args

    return _mlp_args(block)


def test_keep_all_plan_is_the_dense_model():
    model = _model().eval()
    images = torch.randn(5, 2, 16, 16)
    with torch.no_grad():
        dense = model(images)
        pruned = ps.PrunedViT(model, ps.SlimPlan.dense(CONFIG.num_tokens, CONFIG.depth))(images)
    assert (pruned - dense).abs().max() <= 1e-5


def test_gradients_match_the_masked_reference():
    model = _model(torch.float64, seed=5)
    plan = _random_plan(CONFIG, 5)
    images = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    ps.PrunedViT(model, plan)(images).square().sum().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    masked_reference(model, plan, images).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("isa", cpu_isas())
def test_each_cpu_isa(isa, cpu_isa_env):
    model = _model()
    plan = _random_plan(CONFIG, 1)
    images = torch.randn(2, 2, 16, 16)
    cpu_isa_env("scalar")
    with torch.no_grad():
        want = ps.PrunedViT(model, plan)(images)
    cpu_isa_env(isa)
    with torch.no_grad():
        got = ps.PrunedViT(model, plan)(images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cuda_equals_cpu():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available (no GPU on this machine, or torch built without CUDA)")
    model = _model()
    plan = _random_plan(CONFIG, 2)
    images = torch.randn(4, 2, 16, 16)
    with torch.no_grad():
        want = ps.PrunedViT(model, plan)(images)
        got = ps.PrunedViT(model.cuda(), plan).cuda()(images.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_torch_compile_matches_eager():
    model = _model().eval()
    pruned = ps.PrunedViT(model, _random_plan(CONFIG, 3))
    images = torch.randn(2, 2, 16, 16)
    compiled = torch.compile(pruned, fullgraph=True)
    torch.testing.assert_close(compiled(images), pruned(images))
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), pruned(images))


def test_attention_maps_of_chosen_blocks():
    model = _model()
    plan = _random_plan(CONFIG, 4)
    pruned = ps.PrunedViT(model, plan)
    images = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        logits, maps = pruned.forward_with_attention(images, [0, 2])
        torch.testing.assert_close(logits, pruned(images))
    assert sorted(maps) == [0, 2]
    for block, probs in maps.items():
        assert probs.shape == (2, CONFIG.num_heads, plan.keep_counts[block], CONFIG.num_tokens)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_flops_equal_the_analytic_pruned_count():
    model = _model()
    plan = _random_plan(CONFIG, 6)
    images = torch.randn(1, 2, 16, 16)
    assert ps.count_flops(ps.PrunedViT(model, plan), (images,)) == ps.flops_of(
        CONFIG, plan.keep_counts
    )
    with torch.no_grad():
        assert ps.count_flops(ps.PrunedViT(model, plan), (images,)) == ps.flops_of(
            CONFIG, plan.keep_counts
        )


def test_plan_round_trips_and_masks():
    plan = _random_plan(CONFIG, 7)
    assert ps.SlimPlan.from_json(plan.to_json()) == plan
    rebuilt = ps.SlimPlan.from_masks(plan.masks())
    assert torch.equal(rebuilt.masks(), plan.masks())
    assert rebuilt.keep_counts == plan.keep_counts


@pytest.mark.parametrize(
    ("order", "counts", "message"),
    [
        ([0, 1, 1, 3], [4, 2], "permutation"),
        ([1, 0, 2, 3], [4, 2], "start with the class token 0"),
        ([0, 1, 2, 3], [2, 3], "non-increasing"),
        ([0, 1, 2, 3], [4, 0], r"keep_counts\[1\] must be in \[1, N=4\]"),
        ([0, 1, 2, 3], [5, 1], r"keep_counts\[0\] must be in \[1, N=4\]"),
        ([0, 1, 2, 3], [], "one entry per block"),
        ([[0, 1], [2, 3]], [2], "1-D integer tensor"),
    ],
)
def test_invalid_plans(order, counts, message):
    with pytest.raises(ValueError, match=message):
        ps.SlimPlan(torch.tensor(order), counts)


def test_invalid_masks_and_mismatched_plan():
    with pytest.raises(ValueError, match="nested"):
        ps.SlimPlan.from_masks(torch.tensor([[1, 1, 0], [1, 0, 1]]))
    with pytest.raises(ValueError, match="class token"):
        ps.SlimPlan.from_masks(torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="plan is for 5 tokens"):
        ps.PrunedViT(_model(), ps.SlimPlan.dense(5, 4))
    with pytest.raises(ValueError, match="not a SlimPlan JSON"):
        ps.SlimPlan.from_json("{}")
