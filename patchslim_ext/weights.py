"""Reading state dicts without pickle, and strict loading with errors that name the key.

A leaf module: it imports nothing from the package, so that models, checkpoints and
tools can all use it without import cycles.

- ``.safetensors`` files, and
- ``.pth``/``.pt`` files read with ``torch.load(..., weights_only=True)``, such as the
  official DeiT and T2T-ViT checkpoints (a ``"model"`` or ``"state_dict"`` entry holding
  the state dict is unwrapped).
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


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
        # torch's unpickling errors span paragraphs; the first line names the problem.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from error
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
