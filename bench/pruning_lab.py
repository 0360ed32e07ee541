"""Shared machinery of the single-block pruning experiments (paper Figs. 6-7, issue 12).

- the two models: the bundled demo ViT and a second architecture (8 blocks, C = 64,
  4 heads) trained here on the 4,000 training digits, seeded and cached;
- :class:`DenseRun`: a dense pass that keeps every block's input and, for calibration
  sets, the attention maps;
- :func:`single_block_outcome`: pruning ONE block l with a keep mask m, every other
  block dense (paper Eq. 2, no fine-tuning). Because every operation of a block except
  attention is row-wise and the keys and values are computed from all N input rows,
  Eq. 2 gives ``Z_l = where(m, Z_l^dense, Z_{l-1})`` exactly (docs/design.md §2): kept
  rows get the dense update, dropped rows pass through. Blocks l+1 … L then run dense;
  block L only on the class token row, the only one the head reads;
- the scores of block l for single-block pruning: the chain of Eq. 13 runs through the
  dense blocks l+1 … L−1 (all N tokens kept) and ends at block L's class-token row
  (``keep_counts = [N, …, N, 1]``).

Conventions: blocks are 0-indexed in code, 1-indexed (the paper's) in tables and plots.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import patchslim_ext
from patchslim_ext import load_model, save_model, train
from patchslim_ext.data import DIGITS_MEAN, DIGITS_STD, load_digits, take_images
from patchslim_ext.plan import SlimPlan
from patchslim_ext.pruning import pruned_block_
from patchslim_ext.scoring import impact_scores
from patchslim_ext.vit import VisionTransformer, ViTConfig

DEMO_CHECKPOINT = Path(patchslim_ext.__file__).parent / "assets" / "digits_vit.safetensors"
SECOND_CONFIG = ViTConfig(
    img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=8, num_heads=4
)
# Training recipe of the second model: the bundled demo model's (patchslim_ext/assets/
# README.md): AdamW, cosine schedule, label smoothing 0.1, random shifts of up to 2 pixels.
SECOND_TRAINING = {
    "epochs": 40,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup_epochs": 3,
    "label_smoothing": 0.1,
    "max_shift": 2,
    "seed": 0,
}
MODEL_NAMES = ("demo_d12c96", "second_d8c64")
RATES = tuple(range(0, 100, 10))  # pruning rates (%) of the patch tokens
BASE_METHODS = ("impact", "attn", "random")
# Images per batch in the blocks above a pruned block (fits the 1-thread caches).
EVAL_BATCH = 100
# A patch is background when every one of its pixels is below this raw value (0..1).
BACKGROUND_PIXEL = 0.05


def set_single_thread() -> None:
    """One intra-op thread: the experiments share a 2-core machine."""
    torch.set_num_threads(1)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def second_model(cache: Path) -> tuple[VisionTransformer, dict[str, Any]]:
    """The second architecture, trained on the training digits once and cached at ``cache``.

    Returns the model (eval mode) and a record of how it was made (recipe, epoch losses,
    training seconds, file hash).
    """
    info_path = cache.with_suffix(".json")
    if cache.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        return load_model(cache).eval(), info
    log(f"training the second model ({SECOND_CONFIG.depth} blocks, C={SECOND_CONFIG.embed_dim})")
    torch.manual_seed(SECOND_TRAINING["seed"])
    model = VisionTransformer(SECOND_CONFIG)
    start = time.perf_counter()
    logs = train(model, load_digits("train"), progress=False, **SECOND_TRAINING)
    seconds = time.perf_counter() - start
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_model(model.eval(), cache)
    info = {
        "config": SECOND_CONFIG.to_dict(),
        "training": SECOND_TRAINING,
        "epoch_losses": [round(entry.loss, 4) for entry in logs],
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "sha256": sha256_of(cache),
    }
    info_path.write_text(json.dumps(info, indent=2))
    return model, info


def load_models(cache_dir: Path) -> dict[str, tuple[VisionTransformer, dict[str, Any]]]:
    """Both models by name, with a description record each."""
    demo = load_model(DEMO_CHECKPOINT).eval()
    demo_info = {"config": demo.config.to_dict(), "sha256": sha256_of(DEMO_CHECKPOINT)}
    second, second_info = second_model(cache_dir / "second_d8c64.safetensors")
    return {MODEL_NAMES[0]: (demo, demo_info), MODEL_NAMES[1]: (second, second_info)}


def fig7_blocks(depth: int) -> list[int]:
    """The paper's Fig. 7 panels prune blocks 3, 7 and 11 of 12; the same relative depths
    (0-indexed) for a model of ``depth`` blocks."""
    return sorted({min(depth - 1, max(0, round(b * depth / 12) - 1)) for b in (3, 7, 11)})


def background_patches(images: Tensor, patch_size: int) -> Tensor:
    """(B, N_p) bool: patches whose raw pixels (0..1) are all below BACKGROUND_PIXEL."""
    raw = images * DIGITS_STD + DIGITS_MEAN
    per_patch = F.max_pool2d(raw, patch_size).flatten(1)
    return per_patch < BACKGROUND_PIXEL


@dataclass
class DenseRun:
    """A dense pass over a fixed image set.

    ``tokens[l]`` is block l's input ``Z_{l-1}`` (B, N, C) for l = 0 … L−1, and
    ``tokens[L]`` the last block's output. ``maps[l]`` is block l's attention
    (B, H, N, N) when the maps were kept; ``cls_maps[l]`` is always kept: the class
    token's row of it, (B, H, N).
    """

    tokens: list[Tensor]
    maps: list[Tensor]
    cls_maps: list[Tensor]
    logits: Tensor

    @property
    def depth(self) -> int:
        return len(self.tokens) - 1


@torch.no_grad()
def dense_run(model: VisionTransformer, images: Tensor, keep_maps: bool) -> DenseRun:
    x = model.embed(images)
    tokens, maps, cls_maps = [x], [], []
    for block in model.blocks:
        x, probs = block(x, return_attention=True)
        tokens.append(x)
        cls_maps.append(probs[:, :, 0].clone())
        if keep_maps:
            maps.append(probs)
    logits = model.forward_head(model.norm(x[:, :1]))
    return DenseRun(tokens, maps, cls_maps, logits)


def chain_inputs(run: DenseRun, block: int) -> tuple[list[Tensor], list[int]]:
    """``attn`` and ``keep_counts`` of :func:`impact_scores` for pruning ``block`` alone:
    the dense blocks above keep every token, the last block only the class token."""
    depth, tokens = run.depth, run.tokens[0].shape[1]
    if block == depth - 1:
        return [run.maps[block]], []
    above = [run.maps[j] for j in range(block + 1, depth - 1)]
    last = run.maps[depth - 1][:, :, :1]
    return [run.maps[block], *above, last], [tokens] * len(above) + [1]


def library_scores(run: DenseRun, block: int, method: str, seed: int) -> Tensor:
    """Block ``block``'s calibration-mean scores from ``patchslim_ext.scoring`` (N,);
    the random scores are drawn from the seed ``1000·seed + block``."""
    attn, keep_counts = chain_inputs(run, block)
    generator = torch.Generator().manual_seed(1000 * seed + block)
    return impact_scores(
        attn, run.tokens[block], keep_counts, method=method, generator=generator
    ).double()


def keep_mask(scores: Tensor, rate: int, prefix: int = 1) -> Tensor:
    """(N,) bool: the prefix tokens, and the patches with the largest scores, dropping
    ``round(rate% · N_p)`` patches (ties broken by token index, a stable sort)."""
    tokens = scores.shape[0]
    patches = tokens - prefix
    kept = patches - round(rate * patches / 100)
    order = torch.sort(scores[prefix:], descending=True, stable=True).indices
    mask = torch.zeros(tokens, dtype=torch.bool)
    mask[:prefix] = True
    mask[order[:kept] + prefix] = True
    return mask


@dataclass
class Outcome:
    """How the class token and the prediction change when one block is pruned.

    Errors are relative, summed over images before dividing: ``Σ‖x̂ − x‖² / Σ‖x‖²``.
    ``kl`` is the mean KL(dense ‖ pruned) of the predictions; ``agreement`` the share
    (%) of images whose top-1 class is the dense model's.
    """

    top1: float
    agreement: float
    kl: float
    cls_error: float
    normed_error: float
    logit_error: float

    def to_dict(self) -> dict[str, float]:
        return {key: round(value, 6) for key, value in self.__dict__.items()}

    def record(self, model: str, seed: int, block: int, method: str, rate: int) -> dict[str, Any]:
        """One result row: where it was measured (``block`` 0-indexed) and the outcome."""
        where = {"model": model, "seed": seed, "block": block + 1, "method": method, "rate": rate}
        return {**where, **self.to_dict()}


def _relative(new: Tensor, old: Tensor) -> float:
    return float((new - old).square().sum() / old.square().sum())


class SingleBlockEvaluator:
    """Outcomes of pruning one block of ``model`` on a fixed test set, memoised by
    (block, mask): a mask that several scores or seeds select is run once."""

    def __init__(self, model: VisionTransformer, images: Tensor, labels: Tensor) -> None:
        self.model = model
        self.labels = labels
        self.run = dense_run(model, images, keep_maps=False)
        self.dense_cls = self.run.tokens[-1][:, 0]
        self.dense_normed = model.norm(self.dense_cls).detach()
        self.dense_log_probs = F.log_softmax(self.run.logits, -1)
        self.memo: dict[str, Outcome] = {}
        self.runs = 0

    @staticmethod
    def key(block: int, mask: Tensor) -> str:
        return f"{block}:" + "".join("1" if kept else "0" for kept in mask.tolist())

    def load_memo(self, path: Path) -> None:
        """Outcomes an earlier run saved for the same model and test set."""
        if path.is_file():
            stored = json.loads(path.read_text())
            self.memo.update({key: Outcome(**value) for key, value in stored.items()})

    def save_memo(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({key: value.__dict__ for key, value in self.memo.items()}))

    @torch.no_grad()
    def pruned_cls(self, block: int, mask: Tensor, batch: int = EVAL_BATCH) -> Tensor:
        """The class token (B, C) after the last block, before the final norm, with only
        ``block`` pruned to ``mask`` (Eq. 2, docs/design.md §2).

        The blocks above run dense through the in-place ops (``n_keep = N``; the last
        block ``n_keep = 1``: only the class row is read) in batches of ``batch`` images.
        """
        run, blocks, depth = self.run, self.model.blocks, self.run.depth
        tokens = run.tokens[0].shape[1]
        x = torch.where(mask[None, :, None], run.tokens[block + 1], run.tokens[block])
        for chunk in x.split(batch):  # views of x: updated in place
            for j in range(block + 1, depth):
                pruned_block_(blocks[j], chunk, tokens if j < depth - 1 else 1)
        return x[:, 0]

    @torch.no_grad()
    def outcome(self, block: int, mask: Tensor) -> Outcome:
        key = self.key(block, mask)
        if key in self.memo:
            return self.memo[key]
        # Nothing pruned: the dense model.
        cls = self.dense_cls if bool(mask.all()) else self.pruned_cls(block, mask)
        normed = self.model.norm(cls)
        logits = self.model.forward_head(normed[:, None])
        log_probs = F.log_softmax(logits, -1)
        dense_top = self.run.logits.argmax(-1)
        top = logits.argmax(-1)
        kl = F.kl_div(log_probs, self.dense_log_probs, log_target=True, reduction="batchmean")
        result = Outcome(
            top1=100.0 * float((top == self.labels).double().mean()),
            agreement=100.0 * float((top == dense_top).double().mean()),
            kl=float(kl),
            cls_error=_relative(cls, self.dense_cls),
            normed_error=_relative(normed, self.dense_normed),
            logit_error=_relative(logits, self.run.logits),
        )
        self.memo[key] = result
        self.runs += 1
        return result


def calibration_images(seed: int, size: int) -> Tensor:
    """``size`` training digits drawn with ``seed`` (the calibration draw of a seed)."""
    return take_images(load_digits("train"), size, seed)


def held_out_digits() -> tuple[Tensor, Tensor]:
    images, labels = load_digits("test").tensors
    return images, labels


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample s.d. / √n; 0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: Sequence[float], digits: int = 1) -> str:
    mean, se = mean_se(values)
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


@dataclass
class Timer:
    """Wall-clock seconds of named phases: ``with timer("scores"): ...``."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 1)


def _rounded(value: Any, digits: int) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item, digits) for item in value]
    return value


def write_json(path: Path, payload: Any, digits: int = 6) -> None:
    """``payload`` as compact JSON, floats rounded to ``digits`` significant digits."""
    path.write_text(json.dumps(_rounded(payload, digits), separators=(",", ":")) + "\n")


def jaccard(a: Tensor, b: Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two bool masks (1 when both are empty)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def pairs(items: Sequence[Any]) -> Iterable[tuple[Any, Any]]:
    for i, first in enumerate(items):
        for second in items[i + 1 :]:
            yield first, second


@torch.no_grad()
def masked_reference_logits(
    model: VisionTransformer, images: Tensor, block: int, mask: Tensor
) -> Tensor:
    """Eq. 2 literally, with the model's nn modules: block ``block`` adds its branches
    only where ``mask`` is set (``Z' = Z + diag(m)·Attn(LN1(Z))`` and likewise the MLP);
    every other block is dense. The check of :meth:`SingleBlockEvaluator.pruned_cls`."""
    x = model.embed(images)
    m = mask[None, :, None].to(x.dtype)
    for index, layer in enumerate(model.blocks):
        keep = m if index == block else 1.0
        x = x + keep * layer.ls1(layer.attn(layer.norm1(x)))
        x = x + keep * layer.ls2(layer.mlp(layer.norm2(x)))
    return model.forward_head(model.norm(x[:, :1]))


@torch.no_grad()
def check_single_block_forward(
    model: VisionTransformer, images: Tensor, seed: int = 0
) -> dict[str, float]:
    """Max |logit difference| of the evaluator's single-block forward against
    :func:`masked_reference_logits` (every block, a random 50% mask), and, for block
    L−1 (the one a nested plan can prune alone, with block L keeping only the class
    token), against the library's plan-driven forward (``SlimPlan.from_masks``)."""
    depth, tokens = model.config.depth, model.config.num_tokens
    generator = torch.Generator().manual_seed(seed)
    evaluator = SingleBlockEvaluator(model, images, torch.zeros(images.shape[0]))
    worst_reference = 0.0
    for block in range(depth):
        mask = keep_mask(torch.rand(tokens, generator=generator), 50)
        ours = model.forward_head(model.norm(evaluator.pruned_cls(block, mask)[:, None]))
        reference = masked_reference_logits(model, images, block, mask)
        worst_reference = max(worst_reference, float((ours - reference).abs().max()))
    block = depth - 2
    mask = keep_mask(torch.rand(tokens, generator=generator), 50)
    masks = torch.ones(depth, tokens, dtype=torch.bool)
    masks[block] = mask
    masks[depth - 1] = False
    masks[depth - 1, 0] = True
    model.set_plan(SlimPlan.from_masks(masks))
    try:
        planned = model(images)
    finally:
        model.set_plan(None)
    ours = model.forward_head(model.norm(evaluator.pruned_cls(block, mask)[:, None]))
    return {
        "max_abs_logit_diff_vs_masked_reference": worst_reference,
        "max_abs_logit_diff_vs_slim_plan_block_L-1": float((ours - planned).abs().max()),
    }
