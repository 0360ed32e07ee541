"""Our checkpoints: a model's weights, architecture and plan in one safetensors file.

:func:`save_model` writes the state dict (timm's names) with the
:class:`~patchslim_ext.vit.ViTConfig` and, for a slimmed model, its
:class:`~patchslim_ext.plan.SlimPlan` as JSON metadata. :func:`load_model` reads it
back as the model that was saved, slimmed if it was; it also reads timm/DeiT/T2T-ViT
state dicts (``.pth`` or ``.safetensors`` without our metadata), whose architecture it
infers from the weight shapes, given the number of heads.

Metadata is validated as data before anything is allocated: the config's fields are
type-checked and bounded, and the tensor shapes it implies are compared with the shapes
in the safetensors header.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open
from torch import Tensor, nn

from patchslim_ext.plan import SlimPlan
from patchslim_ext.pruning import PrunableViT
from patchslim_ext.vit import VisionTransformer, ViTConfig, resample_position_embedding
from patchslim_ext.weights import (
    CheckpointError,
    load_state_dict_file,
    load_state_dict_strict,
    save_safetensors,
)

_FORMAT = "patchslim-vit"


def config_from_state_dict(
    state_dict: Mapping[str, Tensor], num_heads: int, img_size: int | None = None
) -> ViTConfig:
    """Infer a :class:`ViTConfig` from the weights of a timm ViT/DeiT/DeiT-III or an
    official T2T-ViT (the number of heads is not visible in the weights: pass it).

    The layout follows the keys: ``dist_token`` (distilled), ``reg_token`` (registers),
    ``blocks.0.ls1.gamma`` (layer scale), ``tokens_to_token.*`` (T2T-ViT, which the
    release trains with attention scaled by ``embed_dim ** -0.5``). The image size is
    the one the position embedding was trained at, unless ``img_size`` is given.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise CheckpointError(
            f"num_heads must be a positive int, got {num_heads!r}: a state dict without "
            "patchslim metadata does not record it"
        )
    try:
        embed_dim = state_dict["cls_token"].shape[-1]
        positions = state_dict["pos_embed"].shape[1]
        num_classes = state_dict["head.weight"].shape[0]
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise CheckpointError(f"not a ViT state dict: no key {error}") from None
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    distilled = "dist_token" in state_dict
    reg_tokens = state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    prefix = 1 + int(distilled) + reg_tokens
    t2t = any(key.startswith("tokens_to_token.") for key in state_dict)
    if t2t:
        performer = "tokens_to_token.attention1.w" in state_dict
        in_chans = state_dict["tokens_to_token.attention1.norm1.weight"].shape[0] // 49
        patch_size = 16
        family = {
            "embed": "t2t_performer" if performer else "t2t_transformer",
            "pos_embed": "sinusoid",
            "attn_scale": embed_dim**-0.5,
            "norm_eps": 1e-5,
        }
    else:
        _, in_chans, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
        family = {}
    # The position embedding covers the patches, and the prefix tokens unless
    # no_embed_class (DeiT-III): whichever count is a square grid.
    no_embed_class = math.isqrt(positions) ** 2 == positions
    patches = positions if no_embed_class else positions - prefix
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise CheckpointError(
            f"pos_embed has {positions} rows: neither {positions - prefix} patches (+{prefix} "
            "prefix tokens) nor itself is a square grid"
        )
    try:
        return ViTConfig(
            img_size=grid * patch_size if img_size is None else img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_hidden / embed_dim,
            qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
            distilled=distilled,
            reg_tokens=reg_tokens,
            no_embed_class=no_embed_class,
            layer_scale="blocks.0.ls1.gamma" in state_dict,
            **family,
        )
    except ValueError as error:
        raise CheckpointError(f"cannot infer the architecture: {error}") from None


def save_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a model's weights, config and plan (if it has one) to ``path``
    (safetensors), atomically: ``<name>.partial`` is written, flushed and renamed over
    ``path`` (:func:`~patchslim_ext.files.atomic_write`), with the mode a new file gets.

    ``model``: our :class:`VisionTransformer` or a timm ViT made prunable
    (:func:`patchslim_ext.timm_models.prunable`).
    """
    if not isinstance(model, PrunableViT):
        raise TypeError(
            f"save_model takes a VisionTransformer or a prunable timm model, got "
            f"{type(model).__name__}"
        )
    path = Path(path)
    metadata = {"format": _FORMAT, "config": json.dumps(model.config.to_dict())}
    if model.plan is not None:
        metadata["plan"] = model.plan.to_json()
    tensors = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata=metadata)  # atomic


def _header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(our metadata or {}, shapes by key) from a safetensors header, without reading data."""
    if path.suffix != ".safetensors":
        return {}, {}
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = handle.keys()  # a safe_open handle is not iterable
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    return (metadata if metadata.get("format") == _FORMAT else {}), shapes


def _parse_metadata(path: Path, metadata: dict[str, str]) -> tuple[ViTConfig, SlimPlan | None]:
    try:
        config = ViTConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid model config in the metadata: {error}") from None
    plan = None
    if "plan" in metadata:
        try:
            plan = SlimPlan.from_json(metadata["plan"])
        except ValueError as error:
            raise CheckpointError(f"{path}: invalid plan: {error}") from None
    return config, plan


def _check_shapes(path: Path, config: ViTConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare the shapes ``config`` implies with the file's, before allocating anything."""
    blocks = {key.split(".")[1] for key in shapes if key.startswith("blocks.")}
    if len(blocks) != config.depth or shapes.get("cls_token", (0,))[-1] != config.embed_dim:
        raise CheckpointError(
            f"{path}: the metadata says depth={config.depth}, embed_dim={config.embed_dim}; "
            f"the weights have {len(blocks)} blocks and a class token of shape "
            f"{shapes.get('cls_token')}"
        )
    with torch.device("meta"):
        model = VisionTransformer(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for key in sorted(set(expected) | set(shapes)):
        if expected.get(key) != shapes.get(key):
            raise CheckpointError(
                f"{path}: key '{key}' has shape {shapes.get(key)} in the file, the metadata's "
                f"architecture expects {expected.get(key)}"
            )


def load_model(
    path: str | os.PathLike,
    *,
    num_heads: int | None = None,
    img_size: int | None = None,
    dense: bool = False,
) -> VisionTransformer:
    """The model a checkpoint holds, as a :class:`VisionTransformer`: slimmed (its plan
    set) if it was saved slimmed, unless ``dense=True``.

    Args:
        path: a file :func:`save_model` wrote, or a timm/DeiT/T2T-ViT state dict
            (``.pth`` read with ``weights_only=True``, or ``.safetensors``).
        num_heads: needed for a state dict without our metadata (the weights do not
            show it); refused if it contradicts our metadata.
        img_size: run at another image size than the checkpoint's: a learned position
            embedding is resampled (bicubic, as timm does). Not for a slimmed model,
            whose plan is for the saved token count.
        dense: drop a saved plan and return the dense model.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, inconsistent, or not a model we can build.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    metadata, shapes = _header(path)
    if metadata:
        config, plan = _parse_metadata(path, metadata)
        if num_heads is not None and num_heads != config.num_heads:
            raise CheckpointError(
                f"{path} records num_heads={config.num_heads}, but num_heads={num_heads} was given"
            )
        _check_shapes(path, config, shapes)
        state_dict = load_state_dict_file(path)
    else:
        plan = None
        state_dict = load_state_dict_file(path)
        if num_heads is None:
            raise CheckpointError(
                f"{path} has no patchslim metadata, and its number of attention heads is not "
                "visible in the weights: give it (num_heads=…, --num-heads)"
            )
        try:
            config = config_from_state_dict(state_dict, num_heads)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
    if img_size is not None and img_size != config.img_size:
        if plan is not None and not dense:
            raise CheckpointError(
                f"{path} is slimmed for {config.num_tokens} tokens at {config.img_size} px; "
                f"load it with dense=True to run it at {img_size} px"
            )
        config, state_dict = _resize(config, state_dict, img_size)
    model = VisionTransformer(config)
    try:
        load_state_dict_strict(model, state_dict)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if plan is not None and not dense:
        try:
            model.set_plan(plan)
        except ValueError as error:
            raise CheckpointError(f"{path}: the plan does not fit the model: {error}") from None
    return model


def _resize(
    config: ViTConfig, state_dict: Mapping[str, Tensor], img_size: int
) -> tuple[ViTConfig, dict[str, Tensor]]:
    if config.pos_embed != "learned":
        raise CheckpointError("only a learned position embedding can be resampled")
    try:
        resized = ViTConfig.from_dict({**config.to_dict(), "img_size": img_size})
    except ValueError as error:
        raise CheckpointError(f"cannot run at img_size={img_size}: {error}") from None
    state_dict = dict(state_dict)
    prefix = 0 if config.no_embed_class else config.num_prefix_tokens
    grid = img_size // config.patch_size
    state_dict["pos_embed"] = resample_position_embedding(state_dict["pos_embed"], grid, prefix)
    return resized, state_dict
