"""Reading state dicts without pickle, strict loading with errors that name the key,
and writing safetensors files atomically with ordinary permissions.

A leaf module (it imports only the error classes and the atomic write), so that models,
checkpoints and tools can all use it without import cycles.

- ``.safetensors`` files, and
- ``.pth``/``.pt`` files read with ``torch.load(..., weights_only=True)``, such as the
  official DeiT and T2T-ViT checkpoints (a ``"model"`` or ``"state_dict"`` entry holding
  the state dict is unwrapped).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from patchslim_ext.errors import CheckpointError
from patchslim_ext.files import atomic_write

__all__ = ["CheckpointError", "load_state_dict_file", "load_state_dict_strict", "save_safetensors"]


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


def save_safetensors(
    tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` through :func:`~patchslim_ext.files.atomic_write`:
    a complete file or none, with the permissions that ``open()`` gives a new file (0644
    under umask 022).

    safetensors writes a private file (0600) whatever the umask, which a checkpoint
    meant to be shared or served should not be; the atomic write restores the mode.
    """
    atomic_write(path, lambda partial: save_file(tensors, partial, metadata=metadata))
