"""patchslim: Patch Slimming for Efficient Vision Transformers.

Slim a timm model in a few lines::

    import timm, patchslim_ext as ps
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    result = ps.slim(model, calibration_images)       # Algorithm 1: 40% fewer FLOPs
    ps.save_model(result.model, "deit_s_slim.safetensors")
    ps.set_plan(model, result.plan)                   # or prune the original in place

The public names are imported when first used (PEP 562), so that ``import
patchslim_ext`` and ``patchslim --help`` do not load torch. The compiled operators
(``torch.ops.patchslim``) are registered by ``patchslim_ext.ops``, which every module
that runs them imports: by ``ps.ops`` or the first model, say; and at once by ``import
patchslim_ext`` when torch is already imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it (``ops`` is the subpackage itself).
_EXPORTS = {
    "MODEL_FACTORIES": "vit",
    "BlockLog": "slimming",
    "CheckpointError": "weights",
    "FinetuneSettings": "settings",
    "PrunableViT": "pruning",
    "SlimPlan": "plan",
    "SlimResult": "slimming",
    "SlimSettings": "settings",
    "TrainSettings": "settings",
    "ViTConfig": "vit",
    "VisionTransformer": "vit",
    "config_from_timm": "timm_models",
    "count_flops": "flops",
    "deit3_small_patch16_224": "vit",
    "deit_base_patch16_224": "vit",
    "deit_small_distilled_patch16_224": "vit",
    "deit_small_patch16_224": "vit",
    "deit_tiny_patch16_224": "vit",
    "digits_vit": "vit",
    "evaluate": "training",
    "finetune": "training",
    "flops_of": "flops",
    "from_timm": "timm_models",
    "load_model": "checkpoint",
    "ops": "ops",
    "prunable": "timm_models",
    "save_model": "checkpoint",
    "set_plan": "timm_models",
    "slim": "slimming",
    "t2t_vit_14": "vit",
    "t2t_vit_t_14": "vit",
    "train": "training",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and keep the name here; a
    submodule (``ps.scoring``) is imported on first access too, as the eager imports
    this package once had made every one of them an attribute."""
    module_name = _EXPORTS.get(name)
    if module_name is None:
        # Never a dunder: probing `__main__` would run the command line.
        if name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        module_name = name
    module = importlib.import_module(f"{__name__}.{module_name}")
    value = module if name == module_name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


# With torch loaded already, the operators cost little more: register them now, so that
# `import torch; import patchslim_ext` makes `torch.ops.patchslim.*` callable, as it
# always has. Without torch (the command line's parser) nothing more is imported.
if "torch" in sys.modules:
    importlib.import_module(f"{__name__}.ops")
