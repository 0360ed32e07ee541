"""patchslim: Patch Slimming for Efficient Vision Transformers.

Importing the package loads the compiled operators (``torch.ops.patchslim``).

Slim a timm model in a few lines::

    import timm, patchslim_ext as ps
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    result = ps.slim(model, calibration_images)       # Algorithm 1: 40% fewer FLOPs
    ps.save_model(result.model, "deit_s_slim.safetensors")
    ps.set_plan(model, result.plan)                   # or prune the original in place
"""

from patchslim_ext import ops
from patchslim_ext.checkpoint import load_model, save_model
from patchslim_ext.flops import count_flops, flops_of
from patchslim_ext.plan import SlimPlan
from patchslim_ext.pruning import PrunableViT
from patchslim_ext.settings import FinetuneSettings, SlimSettings, TrainSettings
from patchslim_ext.slimming import BlockLog, SlimResult, slim
from patchslim_ext.timm_models import config_from_timm, from_timm, prunable, set_plan
from patchslim_ext.training import evaluate, finetune, train
from patchslim_ext.vit import (
    MODEL_FACTORIES,
    VisionTransformer,
    ViTConfig,
    deit3_small_patch16_224,
    deit_base_patch16_224,
    deit_small_distilled_patch16_224,
    deit_small_patch16_224,
    deit_tiny_patch16_224,
    digits_vit,
    t2t_vit_14,
    t2t_vit_t_14,
)
from patchslim_ext.weights import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "MODEL_FACTORIES",
    "BlockLog",
    "CheckpointError",
    "FinetuneSettings",
    "PrunableViT",
    "SlimPlan",
    "SlimResult",
    "SlimSettings",
    "TrainSettings",
    "ViTConfig",
    "VisionTransformer",
    "config_from_timm",
    "count_flops",
    "deit3_small_patch16_224",
    "deit_base_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_small_patch16_224",
    "deit_tiny_patch16_224",
    "digits_vit",
    "evaluate",
    "finetune",
    "flops_of",
    "from_timm",
    "load_model",
    "ops",
    "prunable",
    "save_model",
    "set_plan",
    "slim",
    "t2t_vit_14",
    "t2t_vit_t_14",
    "train",
]
