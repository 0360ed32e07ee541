"""Algorithm 1 of the paper: top-down patch slimming with block-wise reconstruction tuning.

For block l = L−1 … 1 (``m_L`` = the class token): score block l's tokens on the
calibration images (:mod:`patchslim_ext.scoring`, attention maps of the partially
slimmed model); start from ``m_l = m_{l+1}``; then repeatedly fine-tune block l on
the reconstruction objective and measure

    E_{l+1} = ‖diag(m_{l+1})(Ẑ_{l+1} − Z_{l+1})‖_F² / ‖diag(m_{l+1}) Z_{l+1}‖_F²,

the *relative* error of block l+1's output on the rows it keeps (Ẑ: slimmed blocks l
and l+1 applied to the original input ``Z_{l-1}``; Z: the original model), adding the
r best-scoring remaining tokens to ``m_l`` while ``E_{l+1} > ε``.

Schedules: ``"tolerance"`` (the paper's: ε decides every count), ``"uniform"`` (every
block but the last keeps the same count, chosen to match ``flops_ratio``) and
``"fixed"`` (given ``keep_counts``, e.g. another run's, to compare scores at equal
FLOPs). Fixed counts are reached in one addition, then the block is tuned once.

Under ``torchrun`` every process holds a contiguous shard of the calibration images;
scores, errors and block gradients are summed over processes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from patchslim_ext.data import take_images
from patchslim_ext.errors import NonFiniteError, OutputError, ResumeError, UsageError
from patchslim_ext.flops import flops_of
from patchslim_ext.plan import SlimPlan, check_keep_counts
from patchslim_ext.pruning import pruned_block
from patchslim_ext.scoring import SCORE_METHODS, ScoreAccumulator
from patchslim_ext.timm_models import prunable
from patchslim_ext.training import (
    all_reduce_sum,
    check_finite_step,
    optimizer_step,
    process_group,
)
from patchslim_ext.vit import ViTConfig

SCHEDULES = ("tolerance", "uniform", "fixed")
STATE_FILE = "state.json"
_STATE_VERSION = 1
_WEIGHTS_NAME = re.compile(r"weights-\d+\.safetensors")


@dataclass
class BlockLog:
    """What happened at one block (1-indexed, as in the paper)."""

    block: int
    kept: int
    errors: list[float] = field(default_factory=list)  # E_{l+1} after each step
    kept_per_step: list[int] = field(default_factory=list)
    reached_eps: bool = False
    seconds: float = 0.0


@dataclass
class SlimResult:
    """The plan, the slimmed model (a copy of the input model, of its class, with tuned
    weights and the plan set; it shares nothing with the input model) and the per-block
    log, deepest block first."""

    plan: SlimPlan
    model: nn.Module
    log: list[BlockLog]

    @property
    def flops(self) -> int:
        return flops_of(self.model.config, self.plan.keep_counts)


@dataclass
class _State:
    """Progress of a run: tokens in the order they were first kept (class token first),
    keep counts of the blocks done, and the log."""

    kept_order: list[int]
    keep_counts: dict[int, int]  # 0-indexed block -> n
    log: list[BlockLog]

    def token_order(self, tokens: int) -> list[int]:
        kept = set(self.kept_order)
        return self.kept_order + [t for t in range(tokens) if t not in kept]

    def counts(self, config: ViTConfig) -> list[int]:
        return [self.keep_counts.get(b, config.num_tokens) for b in range(config.depth)]

    def plan(self, config: ViTConfig) -> SlimPlan:
        """The blocks done so far slimmed, the others dense."""
        return SlimPlan(
            self.token_order(config.num_tokens), self.counts(config), config.num_prefix_tokens
        )


def uniform_keep_counts(config: ViTConfig, flops_ratio: float) -> list[int]:
    """Keep counts with the same n in every block but the last (which keeps the tokens
    the head reads), n the smallest count (at least the prefix tokens) whose FLOPs reach
    ``flops_ratio`` × dense."""
    if not 0.0 < flops_ratio <= 1.0:
        raise UsageError(f"flops_ratio must be in (0, 1], got {flops_ratio}")
    target = flops_ratio * flops_of(config)
    last = [config.num_head_tokens]
    for n in range(config.num_prefix_tokens, config.num_tokens + 1):
        counts = [n] * (config.depth - 1) + last
        if flops_of(config, counts) >= target:
            return counts
    return [config.num_tokens] * (config.depth - 1) + last


def _fingerprint(model: nn.Module, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _RunDirectory:
    """Atomic checkpoints of a run: ``weights-<block>.safetensors`` (the tuned blocks)
    written first, then ``state.json`` naming it, each via a temporary file and a
    rename. ``state.json`` is the commit point, so a kill at any moment leaves either
    the previous state or the new one."""

    def __init__(self, path: str | os.PathLike, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    def load(self, student: nn.Module) -> _State | None:
        state_path = self.path / STATE_FILE
        if not state_path.is_file():
            return None
        try:
            saved = json.loads(state_path.read_text())
            if not isinstance(saved, dict):
                raise ResumeError(f"{STATE_FILE} does not hold a JSON object")
            if saved.get("version") != _STATE_VERSION:
                raise ResumeError(f"unknown state version {saved.get('version')}")
            if saved["fingerprint"] != self.fingerprint:
                raise ResumeError(
                    "it holds a run of a different model or different settings; use another "
                    "run directory or delete this one"
                )
            state = _State(
                kept_order=[_json_int(t) for t in saved["kept_order"]],
                keep_counts={int(b): _json_int(n) for b, n in saved["keep_counts"].items()},
                log=[BlockLog(**entry) for entry in saved["log"]],
            )
            _check_state(state, student.config)
            weights = self._tuned_weights(saved["weights"], state, student)
            student.load_state_dict(weights, strict=False)  # exactly the tuned blocks
            return state
        except ResumeError as error:
            raise ResumeError(f"cannot resume from {self.path}: {error}") from None
        except (OSError, KeyError, TypeError, AttributeError, ValueError, SafetensorError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ResumeError(
                f"cannot resume from {self.path}: {type(error).__name__}: {reason}"
            ) from None

    def _tuned_weights(self, name: object, state: _State, student: nn.Module) -> dict:
        """The weights file ``name`` of the run directory, checked against the model: a
        plain ``weights-<block>.safetensors`` file in the directory, holding exactly the
        tensors of the blocks done (``state.keep_counts``), with the model's shapes and
        dtypes, all finite."""
        if not isinstance(name, str) or not _WEIGHTS_NAME.fullmatch(name):
            raise ResumeError(
                f"{STATE_FILE} names the weights {name!r}, not a weights-<block>.safetensors "
                "file in the run directory"
            )
        path = self.path / name
        if path.is_symlink() or not path.is_file():
            raise ResumeError(f"{name} is missing or not a plain file")
        try:
            weights = load_file(path)
        except (OSError, SafetensorError) as error:
            raise ResumeError(f"cannot read {name}: {error}") from None
        prefixes = tuple(f"blocks.{b}." for b in state.keep_counts)
        expected = {k: v for k, v in student.state_dict().items() if k.startswith(prefixes)}
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        if missing or unexpected:
            problems = [f"lacks {', '.join(missing[:3])}" if missing else ""]
            problems.append(f"has unexpected {', '.join(unexpected[:3])}" if unexpected else "")
            raise ResumeError(
                f"{name} does not hold exactly the tuned blocks "
                f"{sorted(b + 1 for b in state.keep_counts)}: "
                + "; ".join(problem for problem in problems if problem)
                + (" ..." if len(missing) > 3 or len(unexpected) > 3 else "")
            )
        for key, tensor in weights.items():
            if tensor.shape != expected[key].shape or tensor.dtype != expected[key].dtype:
                raise ResumeError(
                    f"{name}: {key} is {tensor.dtype} {tuple(tensor.shape)}, the model's is "
                    f"{expected[key].dtype} {tuple(expected[key].shape)}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ResumeError(f"{name}: {key} holds NaN or infinite values")
        return weights

    def save(self, state: _State, student: nn.Module, block: int) -> None:
        try:
            self._save(state, student, block)
        except OSError as error:
            raise OutputError(f"cannot write the run directory {self.path}: {error}") from None

    def _save(self, state: _State, student: nn.Module, block: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tuned = {f"blocks.{b}." for b in state.keep_counts}
        weights = {
            name: tensor.detach().cpu().contiguous()
            for name, tensor in student.state_dict().items()
            if any(name.startswith(prefix) for prefix in tuned)
        }
        weights_name = f"weights-{block}.safetensors"
        _atomic(self.path / weights_name, lambda tmp: save_file(weights, tmp))
        document = {
            "version": _STATE_VERSION,
            "fingerprint": self.fingerprint,
            "weights": weights_name,
            "kept_order": state.kept_order,
            "keep_counts": {str(b): n for b, n in state.keep_counts.items()},
            "log": [asdict(entry) for entry in state.log],
        }
        _atomic(self.path / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(document)))
        for stale in self.path.glob("weights-*.safetensors"):
            if stale.name != weights_name:
                stale.unlink(missing_ok=True)


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _json_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ResumeError(f"{STATE_FILE} holds {value!r} where an integer belongs")
    return value


def _check_state(state: _State, config: ViTConfig) -> None:
    """A saved state that the model can resume from: the blocks done are the deepest
    ones, their keep counts nested (non-increasing with depth, the last block keeping the
    head's tokens), the kept tokens distinct, prefix tokens first, as many as the
    shallowest block done keeps, and one log entry per slimmed block."""
    tokens, depth, prefix = config.num_tokens, config.depth, config.num_prefix_tokens
    done = sorted(state.keep_counts)
    if done != list(range(depth - len(done), depth)) or len(done) < 2:
        raise ResumeError(f"the blocks done, {[b + 1 for b in done]}, are not the deepest ones")
    counts = [state.keep_counts[b] for b in done]
    if (
        counts[-1] != config.num_head_tokens
        or counts != sorted(counts, reverse=True)
        or not prefix <= counts[0] <= tokens
    ):
        raise ResumeError(f"keep counts {counts} are not nested within 1..{tokens}")
    order = state.kept_order
    if (
        order[:prefix] != list(range(prefix))
        or len(set(order)) != len(order)
        or not all(0 <= t < tokens for t in order)
    ):
        raise ResumeError("the kept tokens are not distinct tokens starting with the prefix tokens")
    if len(order) != counts[0]:
        raise ResumeError(f"{len(order)} tokens kept but block {done[0] + 1} keeps {counts[0]}")
    logged = sorted(entry.block - 1 for entry in state.log)
    if logged != done[:-1]:
        raise ResumeError(f"the log covers blocks {[b + 1 for b in logged]}, not the blocks done")


@torch.no_grad()
def _dense_features(
    teacher: nn.Module, images: Tensor, block: int, batch_size: int
) -> tuple[Tensor, Tensor]:
    """The original model's input of ``block`` and output of ``block + 1`` (0-indexed),
    each (M, N, C) in the original token order."""
    inputs, targets = [], []
    for start in range(0, images.shape[0], batch_size):
        x = teacher.embed(images[start : start + batch_size])
        for b in range(block):
            x = teacher.blocks[b](x)
        inputs.append(x)
        targets.append(teacher.blocks[block + 1](teacher.blocks[block](x)))
    return torch.cat(inputs), torch.cat(targets)


@torch.no_grad()
def _block_scores(
    student: nn.Module,
    images: Tensor,
    inputs: Tensor,
    block: int,
    state: _State,
    method: str,
    generator: torch.Generator,
    batch_size: int,
) -> Tensor:
    """Scores (N,) of block ``block``'s tokens, original order, from the attention maps
    of the partially slimmed model (blocks above already slimmed)."""
    config = student.config
    plan = state.plan(config)
    order, counts = plan.token_order, plan.keep_counts
    student.set_plan(plan)
    accumulator = ScoreAccumulator(config.num_tokens, method, generator=generator)
    wanted = range(block, config.depth)
    for start in range(0, images.shape[0], batch_size):
        _, attention = student.forward_tokens(images[start : start + batch_size], wanted)
        accumulator.update(
            [attention[b] for b in wanted],
            inputs[start : start + batch_size][:, order],
            counts[block + 1 :],
        )
    if method != "random":
        accumulator.total = all_reduce_sum(accumulator.total)
        accumulator.count = int(all_reduce_sum(torch.tensor([accumulator.count])).item())
    in_prefix_order = accumulator.scores()
    scores = torch.empty_like(in_prefix_order)
    scores[order] = in_prefix_order
    return scores


def _relative_error(
    student: nn.Module,
    block: int,
    inputs: Tensor,
    targets: Tensor,
    counts: Sequence[int],
    batch_size: int,
) -> float:
    """E_{block+2} (paper numbering) over all calibration images, all processes."""
    sums = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            x = pruned_block(
                student.blocks[block], inputs[start : start + batch_size], counts[block]
            )
            x = pruned_block(student.blocks[block + 1], x, counts[block + 1])
            target = targets[start : start + batch_size, : counts[block + 1]]
            sums[0] += (x[:, : counts[block + 1]] - target).double().square().sum().item()
            sums[1] += target.double().square().sum().item()
    error, norm = all_reduce_sum(sums).tolist()
    if norm > 0 or math.isnan(norm):
        return error / norm  # NaN where the model's own rows are NaN
    return 0.0 if error == 0 else math.inf  # the model's rows are zero: E is undefined


def _tune_block(
    student: nn.Module,
    block: int,
    inputs: Tensor,
    targets: Tensor,
    counts: Sequence[int],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> None:
    """Adam on block ``block``'s parameters, loss E (relative, summed over processes),
    through the already-slimmed block above."""
    if epochs == 0:
        return
    _, world = process_group()
    kept_above = counts[block + 1]
    params = list(student.blocks[block].parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    local_batch = max(1, batch_size // world)
    # Normalise by the global target norm so that summing gradients over processes
    # gives the single-process gradient of the relative error.
    norm_per_image = all_reduce_sum(
        torch.tensor([targets[:, :kept_above].double().square().sum().item(), targets.shape[0]])
    )
    norm_per_image = float(norm_per_image[0] / norm_per_image[1])
    generator = torch.Generator().manual_seed(seed)
    student.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    for epoch in range(epochs):
        permutation = torch.randperm(inputs.shape[0], generator=generator)
        for start in range(0, inputs.shape[0], local_batch):
            index = permutation[start : start + local_batch]
            x = pruned_block(student.blocks[block], inputs[index], counts[block])
            x = pruned_block(student.blocks[block + 1], x, kept_above)
            diff = x[:, :kept_above] - targets[index, :kept_above]
            loss = diff.square().sum() / (norm_per_image * index.numel() * world)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                for param in params:
                    dist.all_reduce(param.grad)
            where = f"block {block + 1}, tuning epoch {epoch + 1}, batch {start // local_batch + 1}"
            check_finite_step(loss, params, where)
            optimizer_step(optimizer, where)
    student.requires_grad_(False)


def slim(
    model: nn.Module,
    calib: Tensor | Dataset,
    *,
    eps: float = 0.01,
    r: int = 10,
    block_epochs: int = 3,
    score: str = "impact",
    schedule: str = "tolerance",
    flops_ratio: float | None = None,
    keep_counts: Sequence[int] | None = None,
    calib_size: int | None = 1024,
    score_size: int | None = None,
    batch_size: int = 64,
    lr: float = 1e-4,
    seed: int = 0,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_block_end: Callable[[BlockLog], None] | None = None,
) -> SlimResult:
    """Algorithm 1: find every block's kept tokens top-down and tune each block.

    Args:
        model: the trained dense model (left unchanged; it is the reconstruction target):
            our :class:`~patchslim_ext.vit.VisionTransformer` or a timm ViT instance.
            Prefix tokens (class, distillation, registers) are kept in every block but
            the last, which keeps the tokens the head reads.
        calib: calibration images (M, in_chans, H, W), or a dataset of ``(image, label)``
            items from which ``calib_size`` images are drawn (seeded).
        eps: tolerance on the relative error E_{l+1} (paper: 0.01–0.02).
        r: tokens added per step (paper: 10 for 197 tokens).
        block_epochs: epochs of block tuning after each addition (paper: 3; 0 turns
            tuning off, leaving the selection alone).
        score: ``"impact"`` (Eq. 13), ``"rollout"``, ``"attn"`` or ``"random"``.
        schedule: ``"tolerance"``, ``"uniform"`` (needs ``flops_ratio``) or ``"fixed"``
            (needs ``keep_counts``, one per block, the last the head's token count).
        calib_size: images drawn from a dataset ``calib`` (None: all of them).
        score_size: images (of the calibration set) used for the scores (None: all).
        batch_size: global batch of scoring, tuning and error passes.
        lr: Adam learning rate of block tuning.
        seed: makes runs repeatable (calibration draw, tuning order, random scores).
        run_dir: where the state is saved after every block; a rerun with the same
            model and settings resumes from it.
        on_block_end: called after each block is finished and saved.

    Returns:
        :class:`SlimResult`; ``result.model`` is a tuned copy of ``model`` with the plan set.
    """
    teacher = prunable(copy.deepcopy(model)).eval().requires_grad_(False)
    student = prunable(copy.deepcopy(model)).eval().requires_grad_(False)
    config = teacher.config
    tokens, depth = config.num_tokens, config.depth
    if score not in SCORE_METHODS:
        raise UsageError(f"score must be one of {SCORE_METHODS}, got {score!r}")
    if schedule not in SCHEDULES:
        raise UsageError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if r < 1 or block_epochs < 0 or not 0 <= eps < math.inf or batch_size < 1 or not lr > 0:
        raise UsageError(
            f"need r >= 1, block_epochs >= 0, finite eps >= 0, batch_size >= 1 and lr > 0; "
            f"got r={r}, block_epochs={block_epochs}, eps={eps}, batch_size={batch_size}, "
            f"lr={lr}"
        )
    if depth < 2:
        raise UsageError("slimming needs at least two blocks")
    targets_per_block = _target_counts(config, schedule, flops_ratio, keep_counts)
    rank, world = process_group()

    if isinstance(calib, Tensor):
        images = calib
    else:
        images = take_images(calib, calib_size or len(calib), seed)  # type: ignore[arg-type]
    expected = (config.in_chans, config.img_size, config.img_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
        raise UsageError(
            f"calibration images must have shape (M, {', '.join(map(str, expected))}), "
            f"got {tuple(images.shape)}"
        )
    shard = -(-images.shape[0] // world)
    images = images[rank * shard : (rank + 1) * shard].to(next(model.parameters()).device)
    score_images = images if score_size is None else images[: -(-score_size // world)]

    settings = {
        "eps": eps, "r": r, "block_epochs": block_epochs, "score": score,
        "schedule": schedule, "targets": targets_per_block, "calib": list(images.shape),
        "score_size": score_size, "batch_size": batch_size, "lr": lr, "seed": seed,
        "world": world, "config": config.to_dict(),
    }  # fmt: skip
    run = _RunDirectory(run_dir, _fingerprint(model, settings)) if run_dir is not None else None
    initial = _State(list(range(config.num_prefix_tokens)), {depth - 1: config.num_head_tokens}, [])
    state = (run.load(student) if run is not None else None) or initial

    blocks = tqdm(
        range(depth - 2, -1, -1),
        desc="slimming",
        unit="block",
        disable=not progress or rank != 0,
    )
    for block in blocks:
        if block in state.keep_counts:
            continue
        start = time.perf_counter()
        entry = BlockLog(block=block + 1, kept=0)
        inputs, targets = _dense_features(teacher, images, block, batch_size)
        generator = torch.Generator().manual_seed(seed * 7919 + block)
        scores = _block_scores(
            student, score_images, inputs, block, state, score, generator, batch_size
        )
        if not bool(torch.isfinite(scores).all()):
            raise NonFiniteError(f"block {block + 1}: the patch scores are not finite")
        kept = set(state.kept_order)
        candidates = [t for t in torch.argsort(-scores, stable=True).tolist() if t not in kept]
        target = targets_per_block[block] if targets_per_block else None
        additions = 0 if target is None else max(0, target - len(state.kept_order))
        step = 0
        while True:
            added, candidates = candidates[:additions], candidates[additions:]
            state.kept_order += added
            counts = state.counts(config)
            counts[block] = len(state.kept_order)
            order = torch.tensor(state.token_order(tokens))
            block_inputs, block_targets = inputs[:, order], targets[:, order]
            _tune_block(
                student, block, block_inputs, block_targets, counts,
                epochs=block_epochs, batch_size=batch_size, lr=lr,
                seed=seed * 104729 + block * 1009 + step,
            )  # fmt: skip
            error = _relative_error(student, block, block_inputs, block_targets, counts, batch_size)
            if not math.isfinite(error):
                raise NonFiniteError(
                    f"block {block + 1}, step {step + 1}: the reconstruction error E is {error}; "
                    "stopped there (blocks finished before are kept in the run directory)"
                )
            entry.errors.append(error)
            entry.kept_per_step.append(counts[block])
            blocks.set_postfix(block=block + 1, kept=counts[block], E=f"{error:.4f}")
            if target is not None or not candidates:
                entry.reached_eps = error <= eps
                break
            if error <= eps:
                entry.reached_eps = True
                break
            additions = r
            step += 1
        entry.kept = len(state.kept_order)
        entry.seconds = time.perf_counter() - start
        state.keep_counts[block] = entry.kept
        state.log.append(entry)
        if run is not None and rank == 0:
            run.save(state, student, block)
        if world > 1:
            dist.barrier()
        if on_block_end is not None:
            on_block_end(entry)

    plan = state.plan(config)
    student.requires_grad_(True).set_plan(plan)
    return SlimResult(plan=plan, model=student, log=state.log)


def _target_counts(
    config: ViTConfig,
    schedule: str,
    flops_ratio: float | None,
    keep_counts: Sequence[int] | None,
) -> list[int] | None:
    if schedule == "tolerance":
        if flops_ratio is not None or keep_counts is not None:
            raise UsageError("schedule='tolerance' takes neither flops_ratio nor keep_counts")
        return None
    if schedule == "uniform":
        if flops_ratio is None or keep_counts is not None:
            raise UsageError("schedule='uniform' needs flops_ratio (and no keep_counts)")
        return uniform_keep_counts(config, flops_ratio)
    if keep_counts is None or flops_ratio is not None:
        raise UsageError("schedule='fixed' needs keep_counts (and no flops_ratio)")
    try:
        counts = list(check_keep_counts(keep_counts, config.num_tokens, config.depth))
    except ValueError as error:
        raise UsageError(f"keep_counts {list(keep_counts)}: {error}") from None
    if counts[-1] != config.num_head_tokens or counts[-2] < config.num_prefix_tokens:
        raise UsageError(
            f"keep_counts must end with {config.num_head_tokens} (the last block keeps the "
            f"tokens the head reads) and keep the {config.num_prefix_tokens} prefix tokens "
            f"before that, got {counts}"
        )
    return counts
