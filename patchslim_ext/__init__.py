"""patchslim: Patch Slimming for Efficient Vision Transformers.

Importing the package loads the compiled operators (``torch.ops.patchslim``).
"""

from patchslim_ext import ops
from patchslim_ext.flops import count_flops, flops_of
from patchslim_ext.plan import SlimPlan
from patchslim_ext.pruned import PrunedViT
from patchslim_ext.vit import (
    VisionTransformer,
    ViTConfig,
    deit_base_patch16_224,
    deit_small_patch16_224,
    deit_tiny_patch16_224,
    digits_vit,
    from_timm,
)

__version__ = "0.1.0"

__all__ = [
    "PrunedViT",
    "SlimPlan",
    "ViTConfig",
    "VisionTransformer",
    "count_flops",
    "deit_base_patch16_224",
    "deit_small_patch16_224",
    "deit_tiny_patch16_224",
    "digits_vit",
    "flops_of",
    "from_timm",
    "ops",
]
