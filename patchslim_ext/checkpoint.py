"""Reading and writing model weights without pickle.

- ``.safetensors`` files (ours carry the :class:`~patchslim_ext.vit.ViTConfig`, and for
  a slimmed model its :class:`~patchslim_ext.plan.SlimPlan`, as JSON metadata), and
- ``.pth``/``.pt`` files read with ``torch.load(..., weights_only=True)``, such as the
  official DeiT checkpoints whose ``"model"`` entry is a timm state dict.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from patchslim_ext.errors import CheckpointError
from patchslim_ext.plan import SlimPlan
from patchslim_ext.pruned import PrunedViT
from patchslim_ext.vit import VisionTransformer, ViTConfig

_FORMAT = "patchslim-vit"
# Head dimension of every ViT/DeiT variant; used only when a checkpoint does not
# record its number of heads (which no weight shape reveals).
_DEFAULT_HEAD_DIM = 64
# CheckpointError is defined in patchslim_ext.errors and importable from here too.
_Loaded = TypeVar("_Loaded")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pth`` (weights only).

    A ``.pth`` holding ``{"model": state_dict, ...}`` (DeiT's release format) or
    ``{"state_dict": ...}`` yields that entry.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is not a readable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        with warnings.catch_warnings():
            # A file that is not a checkpoint is reported below, in one line.
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except (
        SafetensorError,
        pickle.UnpicklingError,
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
    ) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {_load_failure(error)}") from error
    if isinstance(payload, Mapping):
        for entry in ("model", "state_dict"):
            if isinstance(payload.get(entry), Mapping):
                payload = payload[entry]
                break
    if not isinstance(payload, Mapping) or not all(
        isinstance(value, Tensor) for value in payload.values()
    ):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(payload)


def _load_failure(error: BaseException) -> str:
    """One line saying why a file could not be read. torch's refusal of a pickle that
    holds more than tensors spans paragraphs and suggests ``weights_only=False`` (running
    the file's code): we keep only what it refused."""
    text = str(error).strip()
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in text:
        refused = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed|\n|$)", text)
        detail = f" ({refused.group(1).strip()})" if refused else ""
        return (
            f"it is a pickle holding more than tensors{detail}; patchslim loads weights "
            "only and never runs code from a checkpoint"
        )
    return text.splitlines()[0] if text else type(error).__name__


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with errors that name the key.

    Raises:
        CheckpointError: a missing or unexpected key, or a shape that differs.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"checkpoint is missing key(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"checkpoint has unexpected key(s): {', '.join(unexpected)}")
    if problems:
        raise CheckpointError("; ".join(problems))
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"checkpoint key '{key}' has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state_dict, strict=True)


def config_from_state_dict(
    state_dict: Mapping[str, Tensor], num_heads: int | None = None
) -> ViTConfig:
    """Infer a :class:`ViTConfig` from timm-style weight shapes.

    The number of heads is not visible in the weights: pass it, or it is taken as
    ``embed_dim // 64`` (true of ViT and DeiT).
    """
    try:
        embed_dim, in_chans, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
        num_tokens = state_dict["pos_embed"].shape[1]
        num_classes = state_dict["head.weight"].shape[0]
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise CheckpointError(f"not a ViT state dict: no key {error}") from None
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    if num_heads is None:
        if embed_dim % _DEFAULT_HEAD_DIM:
            raise CheckpointError(
                f"cannot infer num_heads for embed_dim {embed_dim}: pass it explicitly"
            )
        num_heads = embed_dim // _DEFAULT_HEAD_DIM
    grid = round((num_tokens - 1) ** 0.5)
    if grid * grid != num_tokens - 1:
        raise CheckpointError(f"pos_embed has {num_tokens} tokens, not 1 + a square number")
    return ViTConfig(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_hidden / embed_dim,
    )


def _naming_the_file(load: Callable[..., _Loaded]) -> Callable[..., _Loaded]:
    """Make every failure of ``load(path, ...)`` to read a model a one-line
    :class:`CheckpointError` that names the file (a malformed config, bad JSON, weight
    shapes that describe no ViT)."""

    @functools.wraps(load)
    def wrapper(path: str | os.PathLike, *args: Any, **kwargs: Any) -> _Loaded:
        try:
            return load(path, *args, **kwargs)
        except (FileNotFoundError, CheckpointError) as error:
            if str(path) in str(error):
                raise
            raise CheckpointError(f"{path}: {error}") from None
        except (ValueError, TypeError, KeyError, AttributeError, SafetensorError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointError(
                f"{path}: not a usable ViT checkpoint: {type(error).__name__}: {reason}"
            ) from None

    return wrapper


def save_model(model: VisionTransformer | PrunedViT, path: str | os.PathLike) -> None:
    """Write weights and config (and a slimmed model's plan) to ``path`` (safetensors),
    atomically: a temporary file is renamed over ``path``."""
    path = Path(path)
    metadata = {"format": _FORMAT, "config": json.dumps(model.config.to_dict())}
    if isinstance(model, PrunedViT):
        metadata["plan"] = model.plan.to_json()
    tensors = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)


def _metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    return metadata if metadata.get("format") == _FORMAT else {}


@_naming_the_file
def load_model(path: str | os.PathLike, num_heads: int | None = None) -> VisionTransformer:
    """Build a :class:`VisionTransformer` from a checkpoint written by :func:`save_model`,
    or from any timm/DeiT state dict (config inferred, see :func:`config_from_state_dict`)."""
    path = Path(path)
    state_dict = load_state_dict_file(path)
    metadata = _metadata(path)
    if "config" in metadata:
        config = ViTConfig.from_dict(json.loads(metadata["config"]))
    else:
        config = config_from_state_dict(state_dict, num_heads)
    model = VisionTransformer.from_config(config)
    load_state_dict_strict(model, state_dict)
    return model


def load_checkpoint(
    path: str | os.PathLike, num_heads: int | None = None
) -> VisionTransformer | PrunedViT:
    """Like :func:`load_model`, but a checkpoint that holds a plan comes back as the
    :class:`PrunedViT` it was saved from."""
    model = load_model(path, num_heads)
    plan = _metadata(Path(path)).get("plan")
    if plan is None:
        return model
    try:
        return PrunedViT(model, SlimPlan.from_json(plan))
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path}: invalid plan: {error}") from None
