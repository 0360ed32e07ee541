"""Real timm models (random weights; conftest makes timm importable on a CPU torch):
conversion, pruning the user's own timm object, Eq. 2, checkpoints, slimming, refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_parameters
from test_pruned import masked_reference, random_plan

import patchslim_ext as ps

timm = pytest.importorskip("timm", reason="timm is not installed (the [test] extra has it)")

# name -> constructor overrides (random weights; the register model at a small size).
MODELS = {
    "deit_tiny_patch16_224": {},
    "deit_small_distilled_patch16_224": {},
    "deit3_small_patch16_224": {},
    "vit_small_patch14_reg4_dinov2": {"img_size": 70, "num_classes": 10},
    "vit_base_patch32_224": {},
    "vit_small_patch16_384": {},
}


def _timm_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = timm.create_model(name, **MODELS[name])
    # Random values everywhere (tokens, layer scales, biases), not timm's init.
    return randomise_parameters(model, seed, scale=0.1).eval()


def _images(model, batch: int = 2, seed: int = 0):
    size = model.patch_embed.img_size[0]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _close(got, want, tol=1e-4):
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert error <= tol, f"relative error {error:.2e} > {tol:.0e}"
    return error


@pytest.mark.parametrize("name", sorted(MODELS))
def test_conversion_and_keep_everything_plan_equal_timm(name):
    model = _timm_model(name)
    images = _images(model)
    ours = ps.from_timm(model).eval()
    with torch.no_grad():
        want = model(images)
        _close(ours(images), want, 1e-5)
        torch.testing.assert_close(ours.forward_features(images), model.forward_features(images))
        config = ours.config
        keep_all = ps.SlimPlan.dense(config.num_tokens, config.depth, config.num_prefix_tokens)
        _close(ours.set_plan(keep_all)(images), want, 1e-5)
        # The user's own timm object, patched in place and restored.
        timm_class = type(model)
        assert ps.set_plan(model, keep_all) is model and isinstance(model, timm_class)
        _close(model(images), want, 1e-5)
        ps.set_plan(model, None)
        assert type(model) is timm_class and not hasattr(model, "plan")
        torch.testing.assert_close(model(images), want, rtol=0, atol=0)
    # Our state dict is timm's, key for key.
    fresh = timm.create_model(name, **MODELS[name])
    fresh.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_nested_plan_equals_eq2_on_timms_modules(name):
    model = _timm_model(name, seed=1)
    images = _images(model, seed=1)
    config = ps.config_from_timm(model)
    plan = random_plan(config, seed=len(name))
    with torch.no_grad():
        want = masked_reference(model, plan, images)
        ps.set_plan(model, plan)
        _close(model(images), want)
        _close(ps.from_timm(model).set_plan(plan)(images), want)
    # With autograd (the training path) too.
    _close(model(images).detach(), want)


def test_checkpoint_of_a_slimmed_timm_model_loads_slimmed(tmp_path):
    name = "deit_small_distilled_patch16_224"
    model = _timm_model(name, seed=2)
    images = _images(model, seed=2)
    plan = random_plan(ps.config_from_timm(model), seed=2)
    ps.set_plan(model, plan)
    path = tmp_path / "slim.safetensors"
    ps.save_model(model, path)
    loaded = ps.load_model(path)
    assert loaded.plan == plan
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
        assert ps.load_model(path, dense=True).plan is None
    fresh = timm.create_model(name)
    fresh.load_state_dict(loaded.state_dict(), strict=True)


def test_timm_state_dict_file_needs_its_number_of_heads(tmp_path):
    name = "deit3_small_patch16_224"
    model = _timm_model(name, seed=3)
    path = tmp_path / "deit3.pth"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(ps.CheckpointError, match="number of attention heads"):
        ps.load_model(path)
    loaded = ps.load_model(path, num_heads=6)
    assert loaded.config == ps.config_from_timm(model)
    images = _images(model, seed=3)
    with torch.no_grad():
        _close(loaded(images), model(images), 1e-5)


def test_loading_at_another_image_size_resamples_like_timm(tmp_path):
    layers = pytest.importorskip("timm.layers")
    model = _timm_model("deit_tiny_patch16_224", seed=4)
    path = tmp_path / "deit_tiny.pth"
    torch.save(model.state_dict(), path)
    loaded = ps.load_model(path, num_heads=3, img_size=288)
    assert loaded.config.img_size == 288 and loaded.config.num_tokens == 1 + 18 * 18
    want = layers.resample_abs_pos_embed(
        model.pos_embed, new_size=(18, 18), num_prefix_tokens=1, interpolation="bicubic"
    )
    torch.testing.assert_close(loaded.pos_embed, want)
    resized = timm.create_model("deit_tiny_patch16_224", img_size=288).eval()
    resized.load_state_dict(loaded.state_dict(), strict=True)
    images = torch.randn(1, 3, 288, 288)
    with torch.no_grad():
        _close(loaded(images), resized(images), 1e-5)


def test_slim_takes_a_timm_model_and_returns_it_slimmed():
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    kwargs = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 3,
        "num_heads": 2,
        "num_classes": 4,
        "reg_tokens": 2,
        "no_embed_class": True,
        "init_values": 0.5,
    }
    torch.manual_seed(5)
    model = vision_transformer.VisionTransformer(**kwargs).eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    images = torch.randn(24, 3, 32, 32)
    result = ps.slim(
        model,
        images,
        schedule="fixed",
        keep_counts=[12, 7, 1],
        block_epochs=1,
        batch_size=8,
        progress=False,
    )
    assert type(model) is vision_transformer.VisionTransformer  # the input is untouched
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
    slimmed = result.model
    assert isinstance(slimmed, vision_transformer.VisionTransformer)
    assert slimmed.plan == result.plan and result.plan.keep_counts == (12, 7, 1)
    assert result.plan.token_order[:3].tolist() == [0, 1, 2]  # class and register tokens
    fresh = vision_transformer.VisionTransformer(**kwargs)
    fresh.load_state_dict(slimmed.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.isfinite(slimmed(images[:4])).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"global_pool": "avg", "class_token": False}, "no 'cls_token'"),
        ({"global_pool": "avg"}, "global_pool='avg'"),
        ({"global_pool": "map"}, "attention-map pooling"),
        ({"qk_norm": True}, "parameters the pruned block does not use"),
        ({"num_classes": 0}, "Linear classifier head"),
        ({"dynamic_img_size": True}, "dynamic_img_size"),
    ],
)
def test_layouts_we_refuse_say_why_in_one_line(kwargs, message):
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    base = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    model = vision_transformer.VisionTransformer(**{**base, **kwargs})
    with pytest.raises(ValueError, match=message) as error:
        ps.set_plan(model, ps.SlimPlan.dense(17, 2))
    assert "\n" not in str(error.value)
    assert type(model) is vision_transformer.VisionTransformer


def test_a_block_without_the_expected_modules_is_refused_in_one_line():
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    model = vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )
    model.blocks[1].mlp = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"blocks.1 has no mlp.fc1"):
        ps.set_plan(model, ps.SlimPlan.dense(17, 2))
