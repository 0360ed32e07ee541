"""Saving and loading weights: round trips, DeiT's .pth layout, clear refusals."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import patchslim_ext as ps
from patchslim_ext.checkpoint import config_from_state_dict, load_model, save_model
from patchslim_ext.vit import VisionTransformer, ViTConfig
from patchslim_ext.weights import (
    CheckpointError,
    load_state_dict_file,
    load_state_dict_strict,
    save_safetensors,
)

SMALL = ViTConfig(
    img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=64, depth=2, num_heads=2
)


def _model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer.from_config(SMALL).eval()


def _same_outputs(a, b):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(images), b(images), rtol=0, atol=0)


def test_safetensors_round_trip(tmp_path):
    model = _model()
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.config == SMALL  # num_heads=2 comes from the metadata
    assert loaded.plan is None
    _same_outputs(model, loaded)
    assert not list(tmp_path.glob("*.partial"))


def test_a_slimmed_checkpoint_loads_slimmed_unless_asked_for_the_dense_model(tmp_path):
    model = _model()
    order = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(16) + 1])
    plan = ps.SlimPlan(order, [12, 1])
    model.set_plan(plan)
    path = tmp_path / "slim.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.plan == plan
    _same_outputs(model, loaded)
    dense = load_model(path, dense=True)
    assert dense.plan is None
    _same_outputs(model.set_plan(None), dense)
    with pytest.raises(CheckpointError, match="slimmed for 17 tokens"):
        load_model(path, img_size=64)
    assert load_model(path, dense=True, img_size=64).config.num_tokens == 65
    with pytest.raises(CheckpointError, match="records num_heads=2"):
        load_model(path, num_heads=4)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_checkpoints_get_the_mode_of_any_new_file(tmp_path, umask):
    """Not safetensors' private 0600: what open() gives a new file under the umask."""
    previous = os.umask(umask)
    try:
        save_model(_model(), tmp_path / "model.safetensors")
        save_safetensors({"weight": torch.zeros(2)}, tmp_path / "weights.safetensors")
        (tmp_path / "reference").touch()
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "reference").stat().st_mode) == expected
    for name in ("model.safetensors", "weights.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "model.safetensors",
        "reference",
        "weights.safetensors",
    ]  # no partial file left


def test_state_dict_round_trip_strict(tmp_path):
    model = _model()
    path = tmp_path / "state.pth"
    torch.save(model.state_dict(), path)
    fresh = VisionTransformer.from_config(SMALL)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    _same_outputs(model, fresh.eval())


def test_deit_release_layout(tmp_path):
    """DeiT's .pth: {"model": timm state dict, ...}; the number of heads is given."""
    model = ps.deit_tiny_patch16_224(num_classes=10, img_size=32)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": model.state_dict(), "epoch": 299}, path)
    with pytest.raises(CheckpointError, match="number of attention heads is not visible"):
        load_model(path)
    loaded = load_model(path, num_heads=3)
    assert loaded.config == model.config
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), model.eval()(images))


def test_missing_key_is_named():
    state = _model().state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\): blocks.1.mlp.fc2.bias"):
        load_state_dict_strict(VisionTransformer.from_config(SMALL), state)


def test_wrong_key_is_named():
    state = _model().state_dict()
    state["blocks.0.attn.qkvv.weight"] = state.pop("blocks.0.attn.qkv.weight")
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "missing key(s): blocks.0.attn.qkv.weight; "
            "checkpoint has unexpected key(s): blocks.0.attn.qkvv.weight"
        ),
    ):
        load_state_dict_strict(VisionTransformer.from_config(SMALL), state)


def test_wrong_shape_is_named():
    state = _model().state_dict()
    state["head.weight"] = torch.zeros(6, 64)
    with pytest.raises(
        CheckpointError, match=r"'head.weight' has shape \(6, 64\), the model expects \(5, 64\)"
    ):
        load_state_dict_strict(VisionTransformer.from_config(SMALL), state)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_state_dict_file(tmp_path / "absent.pth")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_state_dict_file(corrupt)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_state_dict_file(garbage)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict_file(not_a_state_dict)


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a checkpoint that would run code on load is rejected."""
    path = tmp_path / "evil.pth"
    torch.save({"model": _model()}, path)  # a whole module, i.e. arbitrary pickle
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_state_dict_file(path)


@pytest.mark.parametrize(
    "factory",
    [
        ps.digits_vit,
        ps.deit_small_distilled_patch16_224,
        ps.deit3_small_patch16_224,
        ps.t2t_vit_14,
        ps.t2t_vit_t_14,
    ],
)
def test_config_from_state_dict_recovers_every_layout(factory):
    config = factory().config
    state = VisionTransformer(config).state_dict()
    assert config_from_state_dict(state, num_heads=config.num_heads) == config
    with pytest.raises(CheckpointError, match="num_heads must be a positive int, got True"):
        config_from_state_dict(state, num_heads=True)


def _write_with_metadata(path, model, **changes):
    metadata = {"format": "patchslim-vit", "config": json.dumps(model.config.to_dict())}
    metadata.update(changes)
    save_file(
        {key: value.contiguous() for key, value in model.state_dict().items()}, path, metadata
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # The reported attacks: an absurd depth allocates nothing before it is refused;
        # a bool is not a number of heads; keep counts must be integers.
        ({"depth": 10**6}, r"depth must be in \[1, 1024\]"),
        ({"depth": 3}, "the metadata says depth=3"),
        ({"num_heads": True}, "num_heads must be an int, got True"),
        ({"embed_dim": "64"}, "embed_dim must be an int"),
        ({"mlp_ratio": 2.0}, "blocks.0.mlp.fc1.bias"),
    ],
)
def test_checkpoint_metadata_is_validated_before_loading(tmp_path, changes, message):
    model = _model()
    path = tmp_path / "bad.safetensors"
    config = {**model.config.to_dict(), **changes}
    _write_with_metadata(path, model, config=json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


@pytest.mark.parametrize(
    "plan",
    [
        '{"token_order": [0, 1], "keep_counts": [2.7, 1]}',
        '{"token_order": [0, 1], "keep_counts": ["2", 1]}',
        '{"token_order": "01", "keep_counts": [2, 1]}',
        "not json",
        '{"token_order": [0, 1, 2], "keep_counts": [2, 1], "extra": 1}',
    ],
)
def test_bad_plans_in_metadata_are_refused(tmp_path, plan):
    path = tmp_path / "bad_plan.safetensors"
    _write_with_metadata(path, _model(), plan=plan)
    with pytest.raises(CheckpointError, match="invalid plan"):
        load_model(path)


def test_bad_config_json_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "bad_config.safetensors"
    _write_with_metadata(path, _model(), config="{not json")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: invalid model config"):
        load_model(path)


_JUNK = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
    st.lists(st.integers(0, 20), max_size=4),
)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    changes=st.dictionaries(st.sampled_from(sorted(SMALL.to_dict())), _JUNK, max_size=3),
    plan=st.one_of(
        st.none(),
        st.text(max_size=20),
        st.fixed_dictionaries(
            {
                "token_order": st.lists(_JUNK, max_size=20),
                "keep_counts": st.lists(_JUNK, max_size=3),
            }
        ).map(json.dumps),
    ),
)
def test_fuzzed_metadata_loads_or_is_refused_in_one_line(tmp_path_factory, changes, plan):
    """Any metadata: either the model the weights describe, or a one-line CheckpointError;
    never another exception, and nothing allocated beyond the file's own tensors."""
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    model = _model()
    extra = {} if plan is None else {"plan": plan}
    config = {**model.config.to_dict(), **changes}
    _write_with_metadata(path, model, config=json.dumps(config, allow_nan=True), **extra)
    try:
        loaded = load_model(path)
    except CheckpointError as error:
        assert "\n" not in str(error)
        return
    assert loaded.state_dict().keys() == model.state_dict().keys()
