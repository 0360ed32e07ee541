"""timm ``VisionTransformer`` instances: read their layout, prune them in place, convert.

:func:`prunable` patches the user's own timm model, as token merging does: the
model's class becomes a subclass that adds :class:`~patchslim_ext.pruning.PrunableViT`
(``set_plan``, the plan-driven forward) and each block's class one whose
``forward(x, n_keep)`` runs the pruned block. Parameters, names and the state dict are
untouched; ``set_plan(model, None)`` restores the original classes. timm itself is never
imported here (the model is duck-typed).

Supported: class-token pooling; a distillation token (two heads, averaged) or register
tokens; position embedding with or without the prefix tokens (``no_embed_class``); layer
scale; with or without qkv bias; exact GELU. Refused with a one-line reason: global
average or attention-map pooling, qk-norm and other extra normalisations, a missing
position embedding, dynamic image size, non-square images or patches.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from patchslim_ext.plan import SlimPlan
from patchslim_ext.pruning import PrunableViT, pruned_block
from patchslim_ext.vit import VisionTransformer, ViTConfig
from patchslim_ext.weights import load_state_dict_strict

_BLOCK_KEYS = {
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "ls1.gamma",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "ls2.gamma",
}


def _refuse(reason: str) -> ValueError:
    return ValueError(f"cannot prune this timm model: {reason}")


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _check_block(index: int, block: nn.Module, eps: float) -> None:
    for path in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
        try:
            block.get_submodule(path)
        except AttributeError:
            raise _refuse(f"blocks.{index} has no {path}") from None
    unknown = sorted(set(block.state_dict()) - _BLOCK_KEYS)
    if unknown:
        raise _refuse(f"blocks.{index} has parameters the pruned block does not use: {unknown}")
    for name in ("q_norm", "k_norm", "norm"):
        if not _is_identity(getattr(block.attn, name, None)):
            raise _refuse(f"blocks.{index}.attn.{name} is not supported (extra normalisation)")
    if not _is_identity(getattr(block.mlp, "norm", None)):
        raise _refuse(f"blocks.{index}.mlp.norm is not supported (extra normalisation)")
    act = block.mlp.act
    if type(act).__name__ != "GELU" or getattr(act, "approximate", "none") != "none":
        raise _refuse(f"blocks.{index}.mlp.act must be exact GELU, got {act!r}")
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if not isinstance(norm, nn.LayerNorm) or norm.eps != eps:
            raise _refuse(f"blocks.{index}.{name} must be LayerNorm(eps={eps}), got {norm!r}")
    if any(bias is None for bias in (block.attn.proj.bias, block.mlp.fc1.bias, block.mlp.fc2.bias)):
        raise _refuse(f"blocks.{index}: the output projection and the MLP need biases")


def config_from_timm(module: nn.Module) -> ViTConfig:
    """The :class:`ViTConfig` of a timm ``VisionTransformer`` (or ``…Distilled``) instance.

    Raises ``ValueError`` with a one-line reason for a layout we cannot prune.
    """
    for name in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "head"):
        if getattr(module, name, None) is None:
            raise ValueError(f"not a timm VisionTransformer with a class token: no '{name}'")
    pool = getattr(module, "global_pool", "token")
    if getattr(module, "attn_pool", None) is not None or pool == "map":
        raise _refuse("attention-map pooling (global_pool='map') reads every token")
    if pool != "token":
        raise _refuse(f"global_pool={pool!r} averages every token; only 'token' pooling works")
    if getattr(module, "dynamic_img_size", False):
        raise _refuse("dynamic_img_size=True is not supported")
    for name in ("fc_norm", "norm_pre"):
        if not _is_identity(getattr(module, name, None)):
            raise _refuse(f"'{name}' is not supported")
    if not isinstance(module.head, nn.Linear):
        raise _refuse(f"expected a Linear classifier head, got {type(module.head).__name__}")
    proj = module.patch_embed.proj
    if (
        not isinstance(proj, nn.Conv2d)
        or proj.kernel_size != proj.stride
        or proj.kernel_size[0] != proj.kernel_size[1]
        or proj.padding not in ((0, 0), "valid")
    ):
        raise _refuse(f"expected a square, non-overlapping patch embedding, got {proj!r}")
    if not _is_identity(getattr(module.patch_embed, "norm", None)):
        raise _refuse("a normalised patch embedding is not supported")
    img_size = tuple(getattr(module.patch_embed, "img_size", ()))
    if len(img_size) != 2 or img_size[0] != img_size[1]:
        raise _refuse(f"expected a square image size, got {img_size}")
    dist_token = getattr(module, "dist_token", None)
    reg_token = getattr(module, "reg_token", None)
    first = module.blocks[0]
    norm = module.norm
    if not isinstance(norm, nn.LayerNorm):
        raise _refuse(f"expected a LayerNorm final norm, got {norm!r}")
    for index, block in enumerate(module.blocks):
        _check_block(index, block, norm.eps)
    embed_dim = module.cls_token.shape[-1]
    num_heads = first.attn.num_heads
    scale = float(first.attn.scale)
    config = ViTConfig(
        img_size=int(img_size[0]),
        patch_size=int(proj.kernel_size[0]),
        in_chans=proj.in_channels,
        num_classes=module.head.out_features,
        embed_dim=embed_dim,
        depth=len(module.blocks),
        num_heads=num_heads,
        mlp_ratio=first.mlp.fc1.out_features / embed_dim,
        qkv_bias=first.attn.qkv.bias is not None,
        attn_scale=None if math.isclose(scale, (embed_dim // num_heads) ** -0.5) else scale,
        distilled=dist_token is not None,
        reg_tokens=0 if reg_token is None else reg_token.shape[1],
        no_embed_class=bool(getattr(module, "no_embed_class", False)),
        layer_scale=hasattr(first.ls1, "gamma"),
        norm_eps=norm.eps,
    )
    if getattr(module, "num_prefix_tokens", config.num_prefix_tokens) != config.num_prefix_tokens:
        raise _refuse(f"unexpected num_prefix_tokens {module.num_prefix_tokens}")
    return config


def from_timm(module: nn.Module) -> VisionTransformer:
    """A :class:`VisionTransformer` copy of a timm model (same parameter names and values,
    device and dtype); see :func:`config_from_timm` for what is supported."""
    model = VisionTransformer(config_from_timm(module))
    load_state_dict_strict(model, module.state_dict())
    return model.to(module.cls_token.device, module.cls_token.dtype)


class _PrunableTimmBlock:
    """Mixed into a timm block's class: ``block(x, n_keep)`` runs the pruned block."""

    def forward(
        self, x: Tensor, n_keep: int | None = None, *, return_attention: bool = False, **kwargs
    ) -> Tensor | tuple[Tensor, Tensor]:
        if n_keep is None and not return_attention:
            return super().forward(x, **kwargs)
        return pruned_block(self, x, x.shape[1] if n_keep is None else n_keep, return_attention)


class _PrunableTimmViT(PrunableViT):
    """Mixed into a timm ViT's class: timm's embedding, our plan-driven forward."""

    def embed(self, images: Tensor) -> Tensor:
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))

    def set_plan(self, plan: SlimPlan | None) -> nn.Module:
        if plan is None:
            return _restore(self)
        return super().set_plan(plan)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Prunable{base.__name__}", (mixin, base), {"_timm_class": base})
    return _SUBCLASSES[key]


def prunable(model: nn.Module) -> nn.Module:
    """Make a timm ViT prunable in place (our models already are); returns ``model``.

    The model keeps its parameters and state dict; it gains ``config``, ``plan``
    (None: dense) and ``set_plan``.
    """
    if isinstance(model, PrunableViT):
        return model
    config = config_from_timm(model)
    original = type(model)
    for block in model.blocks:
        block.__class__ = _subclass(_PrunableTimmBlock, type(block))
    model.__class__ = _subclass(_PrunableTimmViT, original)
    model.config = config
    PrunableViT.set_plan(model, None)
    return model


def _restore(model: nn.Module) -> nn.Module:
    for block in model.blocks:
        block.__class__ = block._timm_class
    model.__class__ = model._timm_class
    del model.config, model.plan, model.token_order, model._permutes_tokens
    return model


def set_plan(model: nn.Module, plan: SlimPlan | None) -> nn.Module:
    """Run ``plan`` on ``model`` (ours, or a timm ViT, patched in place); ``None`` gives
    the dense model back (a timm model gets its own classes back). Returns ``model``."""
    if plan is None and not isinstance(model, PrunableViT):
        return model
    return prunable(model).set_plan(plan)
