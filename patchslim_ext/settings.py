"""Settings of slimming, training and fine-tuning: one home for the API and the CLI.

Every setting is a dataclass field that carries its default, its help text and its valid
range. :func:`~patchslim_ext.slimming.slim`, :func:`~patchslim_ext.training.train` and
:func:`~patchslim_ext.training.finetune` take these dataclasses (or keyword overrides of
their fields), and the ``patchslim`` command builds its options from the same fields, so
a default, its help and its check are written once.

The names the command offers as choices (models, benchmark models, data splits, ONNX
dtypes) and the demo's settings live here too, for the same reason: this module imports
neither torch nor the rest of the package but :mod:`errors`, so that the command's
parser, and ``patchslim --help``, do not load torch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from patchslim_ext.errors import UsageError

SCORE_METHODS = ("impact", "rollout", "attn", "random")
SCHEDULES = ("tolerance", "uniform", "fixed")
DISTILLATION_MODES = ("none", "soft", "hard")
# What `slim` aims for when given neither eps nor keep counts: the paper's DeiT
# reductions are 43-45% at unchanged accuracy after fine-tuning; 40% leaves margin for
# models that are harder to slim.
DEFAULT_FLOPS_REDUCTION = 0.40
# Counts, seeds and sizes beyond these overflow a C int or a seed somewhere.
MAX_INT = 2**31 - 1
MAX_SEED = 2**32 - 1
# Float settings scale float32 weights: they must be finite there.
MAX_FLOAT32 = 3.4028234663852886e38

# What the command offers by name. The modules that implement them read these (the
# keys of vit.MODEL_FACTORIES are MODEL_NAMES, which a test checks), so that the
# parser can list the choices without importing them.
MODEL_NAMES = (
    "digits_vit",
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit3_small_patch16_224",
    "t2t_vit_14",
    "t2t_vit_t_14",
)
# FLOP reductions of the paper's PS-ViT models (Table 1 and 2): `patchslim bench`'s models.
PAPER_FLOP_REDUCTION = {
    "deit_tiny_patch16_224": 0.462,
    "deit_small_patch16_224": 0.436,
    "deit_base_patch16_224": 0.443,
    "t2t_vit_14": 0.404,
}
DIGITS = "digits"  # the built-in digits, where a command takes an image folder
DIGITS_SPLITS = ("train", "test")
ONNX_DTYPE_NAMES = ("float32", "float16", "bfloat16")  # torch dtype names


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A settings field: ``minimum``/``maximum`` are inclusive bounds, ``above``/``below``
    exclusive ones; ``choices`` the allowed strings."""
    bounds = {"minimum": minimum, "maximum": maximum, "above": above, "below": below}
    metadata = {"help": help, "choices": choices, **bounds}
    return field(default=default, metadata=metadata)


def describe_range(metadata: dict[str, Any]) -> str:
    """The range of a field in words, e.g. ``"in (0, 1)"`` or ``">= 1"``."""
    if metadata["choices"]:
        return f"one of {', '.join(metadata['choices'])}"
    low = metadata["above"] if metadata["above"] is not None else metadata["minimum"]
    high = metadata["below"] if metadata["below"] is not None else metadata["maximum"]
    if low is not None and high is not None:
        opening = "(" if metadata["above"] is not None else "["
        closing = ")" if metadata["below"] is not None else "]"
        return f"in {opening}{low:g}, {high:g}{closing}"
    if low is not None:
        return f"{'>' if metadata['above'] is not None else '>='} {low:g}"
    return "finite"


def value_type(settings_class: type, name: str) -> tuple[type, bool]:
    """(the element type: int, float, str or tuple, whether None is allowed) of a field."""
    hint = typing.get_type_hints(settings_class)[name]
    arguments = typing.get_args(hint)
    optional = type(None) in arguments
    base = next((a for a in arguments if a is not type(None)), hint) if arguments else hint
    return (typing.get_origin(base) or base), optional


def check_value(settings_class: type, name: str, value: Any) -> Any:
    """``value`` checked against field ``name``'s type and range; returns it (an int
    given for a float setting becomes a float). Raises :class:`UsageError` naming the
    field."""
    metadata = next(f.metadata for f in dataclasses.fields(settings_class) if f.name == name)
    kind, optional = value_type(settings_class, name)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{name} must be given, got None")
    if kind is tuple:
        if not isinstance(value, list | tuple) or not all(_is_int(v) for v in value):
            raise UsageError(f"{name} must be a sequence of integers, got {value!r}")
        return tuple(int(v) for v in value)
    if kind is str:
        if value not in metadata["choices"]:
            raise UsageError(f"{name} must be {describe_range(metadata)}, got {value!r}")
        return value
    if kind is int and not _is_int(value):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if kind is float:
        if not (_is_int(value) or isinstance(value, float)):
            raise UsageError(f"{name} must be a number, got {value!r}")
        value = float(value)
    low, high = metadata["minimum"], metadata["maximum"]
    above, below = metadata["above"], metadata["below"]
    if not math.isfinite(value) or abs(value) > (MAX_FLOAT32 if kind is float else MAX_INT):
        limit = "finite in float32" if kind is float else f"at most {MAX_INT} in size"
        raise UsageError(f"{name} must be {limit} and {describe_range(metadata)}, got {value!r}")
    if (
        (low is not None and value < low)
        or (high is not None and value > high)
        or (above is not None and value <= above)
        or (below is not None and value >= below)
    ):
        raise UsageError(f"{name} must be {describe_range(metadata)}, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Settings:
    """Checks every field on construction (type and range, :func:`check_value`)."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            checked = check_value(type(self), item.name, getattr(self, item.name))
            object.__setattr__(self, item.name, checked)

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes``; an unknown name is a :class:`UsageError` listing the
        known ones."""
        known = {item.name for item in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise UsageError(
                f"{type(self).__name__} has no setting {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }


@dataclass(frozen=True)
class SlimSettings(_Settings):
    """Algorithm 1's settings (:func:`patchslim_ext.slim`).

    Which keep counts come out is decided by one of: a FLOP target (``flops_reduction``;
    the default, 40%, when neither ``eps`` nor ``keep_counts`` is given), a tolerance
    (``eps``, tolerance schedule) or given counts (``keep_counts``, fixed schedule).
    """

    flops_reduction: float | None = setting(
        None,
        "fraction of the dense FLOPs to remove; the tolerance schedule searches eps to "
        f"reach it within ±2 points (default: {DEFAULT_FLOPS_REDUCTION:g} when neither "
        "eps nor keep counts are given)",
        above=0.0,
        below=1.0,
    )
    eps: float | None = setting(
        None,
        "tolerance on the relative reconstruction error E_(l+1) instead of a FLOP target "
        "(paper: 0.01-0.02; the useful range depends on the model)",
        minimum=0.0,
        below=1.0,
    )
    r: int = setting(10, "tokens added per step (paper: 10 of 197)", minimum=1)
    block_epochs: int = setting(
        3, "block tuning epochs after each addition (0: no tuning)", minimum=0
    )
    score: str = setting(
        "impact", "patch scores: Eq. 13 impact, or an ablation baseline", choices=SCORE_METHODS
    )
    schedule: str = setting(
        "tolerance",
        "tolerance (eps or a FLOP target decides every block), uniform (one count in "
        "every block but the last, at the FLOP target) or fixed (keep counts)",
        choices=SCHEDULES,
    )
    keep_counts: tuple[int, ...] | None = setting(
        None, "one count per block for the fixed schedule, the last the head's tokens"
    )
    calib_size: int | None = setting(
        1024,
        "calibration images drawn from the data, at most (all of them where it holds fewer; "
        "None: all)",
        minimum=1,
    )
    score_size: int | None = setting(
        None, "calibration images used for the scores (default: all of them)", minimum=1
    )
    batch_size: int = setting(64, "batch of scoring, tuning and error passes", minimum=1)
    lr: float = setting(1e-4, "Adam learning rate of block tuning", above=0.0)
    seed: int = setting(0, "random seed", minimum=0, maximum=MAX_SEED)

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [
            name
            for name in ("flops_reduction", "eps", "keep_counts")
            if getattr(self, name) is not None
        ]
        allowed = {
            "tolerance": ({"flops_reduction"}, {"eps"}, set()),
            "uniform": ({"flops_reduction"}, set()),
            "fixed": ({"keep_counts"},),
        }[self.schedule]
        if set(given) not in allowed:
            needs = {
                "tolerance": "flops_reduction or eps (or neither: a "
                f"{DEFAULT_FLOPS_REDUCTION:g} FLOP target)",
                "uniform": "flops_reduction (or nothing: a "
                f"{DEFAULT_FLOPS_REDUCTION:g} FLOP target)",
                "fixed": "keep_counts",
            }[self.schedule]
            raise UsageError(
                f"schedule {self.schedule!r} takes {needs}, got {', '.join(given) or 'neither'}"
            )

    @property
    def target_reduction(self) -> float | None:
        """The FLOP reduction aimed for (None with eps or keep counts)."""
        if self.eps is not None or self.keep_counts is not None:
            return None
        return DEFAULT_FLOPS_REDUCTION if self.flops_reduction is None else self.flops_reduction


@dataclass(frozen=True)
class TrainSettings(_Settings):
    """Training settings (:func:`patchslim_ext.train`): AdamW with a linear warm-up and a
    cosine schedule; distillation from a teacher is off by default."""

    epochs: int = setting(30, "epochs", minimum=0)
    batch_size: int = setting(128, "global batch (summed over torchrun processes)", minimum=1)
    lr: float = setting(1e-3, "peak learning rate", above=0.0)
    min_lr: float = setting(1e-5, "learning rate at the end of the cosine schedule", minimum=0.0)
    weight_decay: float = setting(0.05, "AdamW weight decay", minimum=0.0)
    warmup_epochs: float = setting(2.0, "linear warm-up epochs", minimum=0.0)
    label_smoothing: float = setting(0.1, "label smoothing", minimum=0.0, maximum=1.0)
    max_shift: int = setting(
        0, "random shifts of up to this many pixels (augmentation; 0: none)", minimum=0
    )
    distillation: str = setting(
        "none",
        "none, soft (KL at temperature tau) or hard (CE on the teacher's argmax)",
        choices=DISTILLATION_MODES,
    )
    distill_weight: float = setting(
        0.5, "alpha, the weight of the distillation term", minimum=0.0, maximum=1.0
    )
    temperature: float = setting(1.0, "tau of soft distillation", above=0.0)
    seed: int = setting(0, "random seed", minimum=0, maximum=MAX_SEED)
    num_workers: int = setting(0, "data-loading processes", minimum=0)


def _default(base: type, name: str, default: Any) -> Any:
    """Field ``name`` of ``base`` with another default (same help and range)."""
    source = next(item for item in dataclasses.fields(base) if item.name == name)
    return field(default=default, metadata=source.metadata)


@dataclass(frozen=True)
class FinetuneSettings(TrainSettings):
    """Fine-tuning a slimmed model (:func:`patchslim_ext.finetune`): a short, low
    learning-rate run with soft distillation from the dense model (DeiT's α = 0.5)."""

    epochs: int = _default(TrainSettings, "epochs", 3)
    lr: float = _default(TrainSettings, "lr", 1e-4)
    min_lr: float = _default(TrainSettings, "min_lr", 1e-6)
    warmup_epochs: float = _default(TrainSettings, "warmup_epochs", 0.0)
    label_smoothing: float = _default(TrainSettings, "label_smoothing", 0.0)
    distillation: str = _default(TrainSettings, "distillation", "soft")


@dataclass
class DemoSettings:
    """Slimming and fine-tuning settings of the demo (``patchslim demo``; r scaled to 50
    tokens from the paper's 10 for 197)."""

    eps: float = 0.0022
    r: int = 3
    block_epochs: int = 3
    calib_size: int = 1000
    finetune_epochs: int = 5
    finetune_lr: float = 2e-4
    finetune_shift: int = 2  # random shifts (pixels), as in the bundled model's training
    seed: int = 0
