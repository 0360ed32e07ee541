"""patchslim: Patch Slimming for Efficient Vision Transformers.

Importing the package loads the compiled operators (``torch.ops.patchslim``).
"""

from patchslim_ext import ops
from patchslim_ext.checkpoint import load_checkpoint, load_model, save_model
from patchslim_ext.flops import count_flops, flops_of
from patchslim_ext.plan import SlimPlan
from patchslim_ext.pruned import PrunedViT
from patchslim_ext.slimming import BlockLog, SlimResult, slim
from patchslim_ext.training import evaluate, finetune, train
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
    "BlockLog",
    "PrunedViT",
    "SlimPlan",
    "SlimResult",
    "ViTConfig",
    "VisionTransformer",
    "count_flops",
    "deit_base_patch16_224",
    "deit_small_patch16_224",
    "deit_tiny_patch16_224",
    "digits_vit",
    "evaluate",
    "finetune",
    "flops_of",
    "from_timm",
    "load_checkpoint",
    "load_model",
    "ops",
    "save_model",
    "slim",
    "train",
]
