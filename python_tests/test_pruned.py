"""Pruning as a mode of the model: SlimPlan, set_plan and the plan-driven forward, against
the paper's Eq. 2 written with dense tensors and diag(m) masks, over every token layout."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_and_cuda, cpu_isas, randomise_parameters

import patchslim_ext as ps
from patchslim_ext.vit import VisionTransformer, ViTConfig

CONFIG = ViTConfig(
    img_size=16, patch_size=4, in_chans=2, num_classes=5, embed_dim=24, depth=4, num_heads=3
)
# Every layout the model covers, small: class token; distilled; DeiT-III (layer scale,
# position embedding on the patches only); registers; T2T-style attention (no qkv bias,
# logits scaled by embed_dim ** -0.5, LayerNorm eps 1e-5).
LAYOUTS = {
    "deit": CONFIG,
    "distilled": ViTConfig(**{**CONFIG.to_dict(), "distilled": True}),
    "deit3": ViTConfig(**{**CONFIG.to_dict(), "layer_scale": True, "no_embed_class": True}),
    "registers": ViTConfig(**{**CONFIG.to_dict(), "reg_tokens": 3}),
    "t2t_attention": ViTConfig(
        **{**CONFIG.to_dict(), "qkv_bias": False, "attn_scale": 24**-0.5, "norm_eps": 1e-5}
    ),
}


def _model(config=CONFIG, dtype=torch.float32, seed=0):
    return randomise_parameters(VisionTransformer(config), seed, scale=0.3).to(dtype)


def random_plan(config: ViTConfig, seed: int) -> ps.SlimPlan:
    """A random nested plan: prefix tokens first and kept in every block but the last,
    which keeps the head's tokens; the patches in random order, random counts."""
    gen = torch.Generator().manual_seed(seed)
    prefix, tokens = config.num_prefix_tokens, config.num_tokens
    order = torch.cat(
        [torch.arange(prefix), torch.randperm(tokens - prefix, generator=gen) + prefix]
    )
    counts = sorted(
        torch.randint(prefix, tokens + 1, (config.depth - 1,), generator=gen).tolist(),
        reverse=True,
    )
    return ps.SlimPlan(order, [*counts, config.num_head_tokens], prefix)


def masked_reference(model, plan, images, return_blocks=False):
    """Paper Eq. 2 with dense tensors on the model's own modules, no permutation: block l
    computes every token and keeps the update only where m_l = 1 (Z' = Z + diag(m) ·).
    Works on any model with timm's attribute names (ours or timm's)."""
    x = model.embed(images) if hasattr(model, "embed") else _timm_embed(model, images)
    masks = plan.masks().to(x.device)
    outputs = []
    for block, mask in zip(model.blocks, masks, strict=True):
        m = mask[None, :, None].to(x.dtype)
        x = x + m * block.ls1(block.attn(block.norm1(x)))
        x = x + m * block.ls2(block.mlp(block.norm2(x)))
        outputs.append(x)
    logits = model.forward_head(model.norm(x))
    return (logits, outputs) if return_blocks else logits


def _timm_embed(model, images):
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def _relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slimmed_model_matches_masked_reference(layout, dtype):
    config = LAYOUTS[layout]
    model = _model(config, dtype, seed=len(layout))
    plan = random_plan(config, seed=len(layout))
    images = torch.randn(3, 2, 16, 16, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    with torch.no_grad():
        want_logits, want_blocks = masked_reference(model, plan, images, return_blocks=True)
        model.set_plan(plan)
        tokens, _ = model.forward_tokens(images)
        want = want_blocks[-1][:, plan.token_order]
        assert _relative_error(tokens, want) <= tol
        inference = model(images)
    training = model.train()(images).detach()
    for logits in (inference, training):
        assert _relative_error(logits, want_logits) <= tol


class _Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_parametrized_weights_reach_the_ops():
    """A block's arguments are read from the modules' parameter dicts where they are
    registered there; a parametrized weight (a property, not a parameter) and a None
    bias still go through getattr, so the slimmed model sees the effective weights."""
    from torch.nn.utils import parametrize

    config = LAYOUTS["t2t_attention"]  # no qkv bias
    model = _model(config, torch.float64, seed=5)
    block = model.blocks[1]
    for linear in (block.attn.qkv, block.mlp.fc2):
        parametrize.register_parametrization(linear, "weight", _Doubled())
    plan = random_plan(config, seed=5)
    images = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        want = masked_reference(model, plan, images)
        got = model.set_plan(plan)(images)
    assert _relative_error(got, want) <= 1e-10


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_keep_everything_plan_is_the_dense_model(layout):
    config = LAYOUTS[layout]
    model = _model(config).eval()
    images = torch.randn(5, 2, 16, 16)
    with torch.no_grad():
        dense = model(images)
        plan = ps.SlimPlan.dense(config.num_tokens, config.depth, config.num_prefix_tokens)
        slimmed = model.set_plan(plan)(images)
    torch.testing.assert_close(slimmed, dense, rtol=1e-5, atol=1e-5)


def test_setting_and_removing_a_plan():
    model = _model().eval()
    images = torch.randn(2, 2, 16, 16)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        dense = model(images)
        plan = random_plan(CONFIG, 1)
        assert ps.set_plan(model, plan) is model and model.plan == plan
        assert model.keep_counts == list(plan.keep_counts)
        assert not torch.equal(model(images), dense)
        # The plan is not in the state dict: the weights stay the dense model's.
        assert model.state_dict().keys() == state.keys()
        ps.set_plan(model, None)
        assert model.plan is None and model.keep_counts == [CONFIG.num_tokens] * CONFIG.depth
        torch.testing.assert_close(model(images), dense, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["deit", "distilled", "registers"])
def test_forward_features_and_head_follow_timms_contract(layout):
    config = LAYOUTS[layout]
    model = _model(config).eval()
    images = torch.randn(2, 2, 16, 16)
    for plan in (None, random_plan(config, 3)):
        model.set_plan(plan)
        with torch.no_grad():
            features = model.forward_features(images)
            assert features.shape == (2, config.num_tokens, config.embed_dim)
            torch.testing.assert_close(model.forward_head(features), model(images))
            pooled = model.forward_head(features, pre_logits=True)
            assert pooled.shape == (2, config.embed_dim)
    # In the original token order: the slimmed features of the head's tokens are those of
    # the masked reference, whose rows are never permuted.
    plan = random_plan(config, 4)
    with torch.no_grad():
        _, blocks = masked_reference(model, plan, images, return_blocks=True)
        features = model.set_plan(plan).forward_features(images)
    torch.testing.assert_close(features, model.norm(blocks[-1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["deit3", "t2t_attention"])
def test_gradients_match_the_masked_reference(layout):
    config = LAYOUTS[layout]
    model = _model(config, torch.float64, seed=5)
    plan = random_plan(config, 5)
    images = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    masked_reference(model, plan, images).square().sum().backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_plan(plan)(images).square().sum().backward()
    for name, p in model.named_parameters():
        if name in want:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12, msg=name)
        else:
            assert p.grad is None or not p.grad.any(), name


@pytest.mark.parametrize("isa", cpu_isas())
def test_each_cpu_isa(isa, cpu_isa_env):
    model = _model()
    plan = random_plan(CONFIG, 1)
    images = torch.randn(2, 2, 16, 16)
    cpu_isa_env("scalar")
    with torch.no_grad():
        want = model.set_plan(plan)(images)
    cpu_isa_env(isa)
    with torch.no_grad():
        got = model(images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cuda_equals_cpu():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available (no GPU on this machine, or torch built without CUDA)")
    model = _model().set_plan(random_plan(CONFIG, 2))
    images = torch.randn(4, 2, 16, 16)
    with torch.no_grad():
        want = model(images)
        got = copy.deepcopy(model).cuda()(images.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile_matches_eager(monkeypatch, device):
    """Also where the environment variable CI is set (CI jobs), in which inductor refuses
    to call the kernel of an op with a decomposition in torch's global table; its caches
    off, so that the graphs are lowered here and not read from an earlier run."""
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("CI", "1")
    model = _model().eval().set_plan(random_plan(CONFIG, 3)).to(device)
    images = torch.randn(2, 2, 16, 16, device=device)
    torch._dynamo.reset()
    with inductor_config.patch(force_disable_caches=True):
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(images), model(images))
        with torch.no_grad():
            torch.testing.assert_close(compiled(images), model(images))


def test_attention_maps_of_chosen_blocks():
    model = _model()
    plan = random_plan(CONFIG, 4)
    model.set_plan(plan)
    images = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        tokens, maps = model.forward_tokens(images, [0, 2])
        torch.testing.assert_close(tokens, model.forward_tokens(images)[0])
    assert sorted(maps) == [0, 2]
    for block, probs in maps.items():
        assert probs.shape == (2, CONFIG.num_heads, plan.keep_counts[block], CONFIG.num_tokens)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_flops_equal_the_analytic_count(layout):
    config = LAYOUTS[layout]
    model = _model(config)
    images = torch.randn(1, 2, 16, 16)
    assert ps.count_flops(model, (images,)) == ps.flops_of(config)
    plan = random_plan(config, 6)
    model.set_plan(plan)
    assert ps.count_flops(model, (images,)) == ps.flops_of(config, plan.keep_counts)
    with torch.no_grad():
        assert ps.count_flops(model, (images,)) == ps.flops_of(config, plan.keep_counts)


def test_plan_round_trips_and_masks():
    for config in LAYOUTS.values():
        plan = random_plan(config, 7)
        assert ps.SlimPlan.from_json(plan.to_json()) == plan
        rebuilt = ps.SlimPlan.from_masks(plan.masks(), config.num_prefix_tokens)
        assert torch.equal(rebuilt.masks(), plan.masks())
        assert rebuilt.keep_counts == plan.keep_counts


@pytest.mark.parametrize(
    ("order", "counts", "message"),
    [
        ([0, 1, 1, 3], [4, 2], "permutation"),
        ([1, 0, 2, 3], [4, 2], r"start with the prefix tokens \[0\]"),
        ([0, 1, 2, 3], [2, 3], "non-increasing"),
        ([0, 1, 2, 3], [4, 0], r"keep_counts\[1\] must be in \[1, N=4\]"),
        ([0, 1, 2, 3], [5, 1], r"keep_counts\[0\] must be in \[1, N=4\]"),
        ([0, 1, 2, 3], [4.0, 1], r"keep_counts\[0\] must be an integer"),
        ([0, 1, 2, 3], ["4", 1], r"keep_counts\[0\] must be an integer"),
        ([0, 1, 2, 3], [True, 1], r"keep_counts\[0\] must be an integer"),
        ([0, 1, 2, 3], [], "one entry per block"),
        ([[0, 1], [2, 3]], [2], "1-D integer tensor"),
    ],
)
def test_invalid_plans(order, counts, message):
    with pytest.raises(ValueError, match=message):
        ps.SlimPlan(torch.tensor(order), counts)


def test_invalid_masks_and_mismatched_plans():
    with pytest.raises(ValueError, match="nested"):
        ps.SlimPlan.from_masks(torch.tensor([[1, 1, 0], [1, 0, 1]]))
    with pytest.raises(ValueError, match="class token"):
        ps.SlimPlan.from_masks(torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="2 prefix tokens"):
        ps.SlimPlan.from_masks(torch.tensor([[1, 0, 1], [1, 0, 0]]), num_prefix_tokens=2)
    with pytest.raises(ValueError, match=r"start with the prefix tokens \[0, 1\]"):
        ps.SlimPlan([0, 2, 1, 3], [4, 2], num_prefix_tokens=2)
    with pytest.raises(ValueError, match="plan is for 5 tokens"):
        _model().set_plan(ps.SlimPlan.dense(5, 4))
    distilled = LAYOUTS["distilled"]
    with pytest.raises(ValueError, match="2 prefix tokens"):
        _model(CONFIG).set_plan(ps.SlimPlan.dense(CONFIG.num_tokens, 4, 2))
    with pytest.raises(ValueError, match="the head reads 2"):
        _model(distilled).set_plan(
            ps.SlimPlan(torch.arange(distilled.num_tokens), [18, 5, 3, 1], 2)
        )
    with pytest.raises(ValueError, match="not a SlimPlan JSON"):
        ps.SlimPlan.from_json("{}")
    with pytest.raises(ValueError, match="not a SlimPlan JSON"):
        ps.SlimPlan.from_json('{"token_order": [0, 1.5], "keep_counts": [2]}')


def test_slimmed_model_trains_and_keeps_its_plan_on_copy():
    model = _model().set_plan(random_plan(CONFIG, 8))
    copied = copy.deepcopy(model)
    assert copied.plan == model.plan
    optimizer = torch.optim.SGD(copied.parameters(), lr=0.1)
    loss = F.cross_entropy(copied(torch.randn(4, 2, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
