"""Saving and loading weights: round trips, DeiT's .pth layout, clear refusals."""

from __future__ import annotations

import re

import pytest
import torch

import patchslim_ext as ps
from patchslim_ext.checkpoint import (
    CheckpointError,
    config_from_state_dict,
    load_model,
    load_state_dict_file,
    load_state_dict_strict,
    save_model,
)
from patchslim_ext.vit import VisionTransformer, ViTConfig

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
    assert loaded.config == SMALL  # num_heads=2 comes from the metadata, not the 64 rule
    _same_outputs(model, loaded)
    assert not list(tmp_path.glob("*.partial"))


def test_state_dict_round_trip_strict(tmp_path):
    model = _model()
    path = tmp_path / "state.pth"
    torch.save(model.state_dict(), path)
    fresh = VisionTransformer.from_config(SMALL)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    _same_outputs(model, fresh.eval())


def test_deit_release_layout(tmp_path):
    """DeiT's .pth: {"model": timm state dict, ...}; heads inferred as C // 64."""
    model = ps.deit_tiny_patch16_224(num_classes=10, img_size=32)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": model.state_dict(), "epoch": 299}, path)
    loaded = load_model(path)
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


def test_config_from_state_dict_needs_heads_when_not_multiple_of_64():
    state = VisionTransformer.from_config(
        ViTConfig(
            img_size=28,
            patch_size=4,
            in_chans=1,
            num_classes=10,
            embed_dim=96,
            depth=1,
            num_heads=3,
        )
    ).state_dict()
    with pytest.raises(CheckpointError, match="cannot infer num_heads"):
        config_from_state_dict(state)
    assert config_from_state_dict(state, num_heads=3).num_heads == 3
