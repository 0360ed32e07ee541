"""Algorithm 1 of the paper: top-down patch slimming with block-wise reconstruction tuning.

For block l = L−1 … 1 (``m_L`` = the class token): score block l's tokens on the
calibration images (:mod:`patchslim_ext.scoring`, attention maps of the partially
slimmed model); start from ``m_l = m_{l+1}``; then repeatedly fine-tune block l on
the reconstruction objective and measure

    E_{l+1} = ‖diag(m_{l+1})(Ẑ_{l+1} − Z_{l+1})‖_F² / ‖diag(m_{l+1}) Z_{l+1}‖_F²,

the *relative* error of block l+1's output on the rows it keeps (Ẑ: slimmed blocks l
and l+1 applied to the original input ``Z_{l-1}``; Z: the original model), adding the
r best-scoring remaining tokens to ``m_l`` while ``E_{l+1} > ε``.

The run works in one token order throughout, the prefix order of docs/design.md §3:
the kept tokens first, candidates after them in score order, so that a block's kept
set is always ``[0, n_l)``. The dense model's tokens after every block are computed
once; block l's scores run blocks l … L of the partially slimmed model from its cached
input (blocks below l are still the dense ones).

What decides the keep counts (:class:`~patchslim_ext.settings.SlimSettings`): a FLOP
target (the default, 40%: ε is searched, docs/design.md §8), a tolerance ε, one count
for every block but the last (``"uniform"``, at the FLOP target) or given counts
(``"fixed"``, e.g. another run's, to compare scores at equal FLOPs; reached in one
addition, then the block is tuned once).

Under ``torchrun`` every process holds a contiguous shard of the calibration images;
scores, errors and block gradients are summed over processes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from patchslim_ext.data import take_images
from patchslim_ext.errors import NonFiniteError, OutputError, ResumeError, UsageError
from patchslim_ext.files import atomic_write
from patchslim_ext.flops import flops_of
from patchslim_ext.plan import SlimPlan, check_keep_counts
from patchslim_ext.pruning import pruned_block
from patchslim_ext.runtime import all_reduce_sum, process_group
from patchslim_ext.scoring import ScoreAccumulator
from patchslim_ext.settings import SlimSettings
from patchslim_ext.timm_models import prunable
from patchslim_ext.training import check_finite_step, optimizer_step
from patchslim_ext.vit import ViTConfig

logger = logging.getLogger("patchslim")

STATE_FILE = "state.json"
_STATE_VERSION = 3
_WEIGHTS_NAME = re.compile(r"weights-\d+\.safetensors")
# A FLOP target is met within this many points of reduction (docs/design.md §8).
FLOPS_TOLERANCE = 0.02
# Runs of the eps search at most; eps is searched in [_EPS_LOW, _EPS_HIGH].
SEARCH_RUNS = 16
_EPS_LOW, _EPS_HIGH, _EPS_START = 1e-8, 0.99, 0.01
# One eps for every block is bisected until the bracketing pair is this close; the
# target then lies in a jump of the FLOPs, which per-block tolerances between the two
# resolve (docs/design.md §8). _BLEND_RESOLUTION: the finest step of the blend position.
_SPLIT_RATIO, _BLEND_RESOLUTION = 1.2, 1 / 16
# Below this top-1 agreement with the dense model on the calibration images, the
# slimmed model has collapsed (fine-tuning rarely recovers it): said loudly.
COLLAPSED_AGREEMENT = 0.8


@dataclass
class BlockLog:
    """What happened at one block (1-indexed, as in the paper). ``eps`` is the tolerance
    the block was held to; it and ``reached_eps`` are None for the uniform and fixed
    schedules, which have no tolerance."""

    block: int
    kept: int
    errors: list[float] = field(default_factory=list)  # E_{l+1} after each step
    kept_per_step: list[int] = field(default_factory=list)
    eps: float | None = None
    reached_eps: bool | None = None
    seconds: float = 0.0


@dataclass
class SearchLog:
    """One run of the eps search: the tolerance of blocks 1 … L−1 (``block_eps[0]`` is
    block 1's), the FLOP reduction it gave, and the largest error E a block accepted (0
    when none did; where the search goes next)."""

    block_eps: list[float]
    flops_reduction: float
    largest_accepted_error: float = 0.0


def describe_eps(block_eps: Sequence[float]) -> str:
    """``block_eps`` (blocks 1 … L−1) in words, deepest blocks first: ``"eps 0.0021"``, or
    ``"eps 0.0025 in blocks 8-11, 0.0023 in block 7, 0.0021 in blocks 1-6"``."""
    if len(set(block_eps)) == 1:
        return f"eps {block_eps[0]:.4g}"
    groups: list[tuple[float, int, int]] = []  # eps, deepest block, shallowest block
    for block in range(len(block_eps), 0, -1):
        eps = block_eps[block - 1]
        if groups and groups[-1][0] == eps:
            groups[-1] = (eps, groups[-1][1], block)
        else:
            groups.append((eps, block, block))
    parts = [
        f"{eps:.4g} in block {deep}" if deep == shallow else f"{eps:.4g} in blocks {shallow}-{deep}"
        for eps, deep, shallow in groups
    ]
    return "eps " + ", ".join(parts)


@dataclass
class SlimResult:
    """The plan, the slimmed model (a copy of the input model, of its class, with tuned
    weights and the plan set; it shares nothing with the input model), the per-block
    log (deepest block first), the tolerance used, the eps search's runs, the top-1
    agreement of the slimmed and dense models on the calibration images, and warnings
    (also logged).

    The tolerance (None for the uniform and fixed schedules) is given or found by the
    search: ``block_eps`` holds the eps of blocks 1 … L−1; ``eps`` is their common value,
    or None where the search had to give the deeper blocks a larger eps than the
    shallower ones to land on the FLOP target (docs/design.md §8)."""

    plan: SlimPlan
    model: nn.Module
    log: list[BlockLog]
    settings: SlimSettings
    block_eps: list[float] | None
    search: list[SearchLog]
    agreement: float
    warnings: list[str]

    @property
    def eps(self) -> float | None:
        if self.block_eps is None or len(set(self.block_eps)) > 1:
            return None
        return self.block_eps[0]

    @property
    def flops(self) -> int:
        return flops_of(self.model.config, self.plan.keep_counts)

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.flops / flops_of(self.model.config)


@dataclass
class _State:
    """A run in prefix order: the token order (prefix tokens first, then the kept tokens
    by the deepest block that keeps them, then the candidates), the keep counts of the
    blocks done, and the log."""

    token_order: list[int]
    keep_counts: dict[int, int]  # 0-indexed block -> n
    log: list[BlockLog]

    @classmethod
    def initial(cls, config: ViTConfig) -> _State:
        return cls(list(range(config.num_tokens)), {config.depth - 1: config.num_head_tokens}, [])

    def counts(self, config: ViTConfig) -> list[int]:
        """Keep counts of every block, N for the blocks not done."""
        return [self.keep_counts.get(b, config.num_tokens) for b in range(config.depth)]

    def plan(self, config: ViTConfig) -> SlimPlan:
        """The blocks done so far slimmed, the others dense."""
        return SlimPlan(self.token_order, self.counts(config), config.num_prefix_tokens)

    @property
    def kept(self) -> int:
        """Tokens the shallowest block done keeps."""
        return self.keep_counts[min(self.keep_counts)]


def _check_counts(config: ViTConfig, counts: Sequence[int]) -> tuple[int, ...]:
    """The one check of keep counts that slimming produces or resumes: nested, one per
    block, the prefix tokens kept in every block but the last, which keeps exactly the
    tokens the head reads. Raises ``ValueError``."""
    counts = check_keep_counts(counts, config.num_tokens, config.depth)
    if counts[-1] != config.num_head_tokens or counts[-2] < config.num_prefix_tokens:
        raise ValueError(
            f"keep counts must end with {config.num_head_tokens} (the last block keeps the "
            f"tokens the head reads) and keep the {config.num_prefix_tokens} prefix tokens "
            f"before that, got {list(counts)}"
        )
    return counts


def uniform_keep_counts(config: ViTConfig, flops_reduction: float) -> list[int]:
    """Keep counts with the same n in every block but the last (which keeps the tokens
    the head reads), n the smallest count (at least the prefix tokens) whose FLOPs are
    at least ``1 - flops_reduction`` of the dense model's."""
    if not 0.0 <= flops_reduction < 1.0:
        raise UsageError(f"flops_reduction must be in [0, 1), got {flops_reduction}")
    target = (1.0 - flops_reduction) * flops_of(config)
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


@dataclass
class _Saved:
    """What a run directory holds: the eps search so far and the last run's state (its
    per-block tolerance, None without one, and the tuned weights of its blocks done)."""

    search: list[SearchLog]
    tolerance: tuple[float, ...] | None
    state: _State
    weights: dict[str, Tensor]


class _RunDirectory:
    """Atomic checkpoints of a run: ``weights-<block>.safetensors`` (the tuned blocks)
    written first, then ``state.json`` naming it, each via a temporary file and a
    rename. ``state.json`` is the commit point, so a kill at any moment leaves either
    the previous state or the new one."""

    def __init__(self, path: str | os.PathLike, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint

    def load(self, student: nn.Module) -> _Saved | None:
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
                token_order=[_json_int(t) for t in saved["token_order"]],
                keep_counts={int(b): _json_int(n) for b, n in saved["keep_counts"].items()},
                log=[BlockLog(**entry) for entry in saved["log"]],
            )
            _check_state(state, student.config)
            search = [
                SearchLog(
                    [float(e) for e in entry["block_eps"]],
                    float(entry["flops_reduction"]),
                    float(entry["largest_accepted_error"]),
                )
                for entry in saved["search"]
            ]
            tolerance = saved["block_eps"]
            if tolerance is not None:
                tolerance = tuple(float(e) for e in tolerance)
            weights = self._tuned_weights(saved["weights"], state, student)
            return _Saved(search, tolerance, state, weights)
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

    def save(
        self,
        search: list[SearchLog],
        tolerance: tuple[float, ...] | None,
        state: _State,
        student: nn.Module,
    ) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            tuned = tuple(f"blocks.{b}." for b in state.keep_counts)
            weights = {
                name: tensor.detach().cpu().contiguous()
                for name, tensor in student.state_dict().items()
                if name.startswith(tuned)
            }
            # A fresh name for every save, so that state.json never names a file being written.
            previous = {path.name for path in self.path.glob("weights-*.safetensors")}
            serial = 1 + max((int(name[8:-12]) for name in previous), default=0)
            weights_name = f"weights-{serial}.safetensors"
            atomic_write(self.path / weights_name, lambda tmp: save_file(weights, tmp))
            document = {
                "version": _STATE_VERSION,
                "fingerprint": self.fingerprint,
                "search": [asdict(entry) for entry in search],
                "block_eps": tolerance,
                "weights": weights_name,
                "token_order": state.token_order,
                "keep_counts": {str(b): n for b, n in state.keep_counts.items()},
                "log": [asdict(entry) for entry in state.log],
            }
            atomic_write(self.path / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(document)))
            for stale in previous:
                (self.path / stale).unlink(missing_ok=True)
        except OSError as error:
            raise OutputError(f"cannot write the run directory {self.path}: {error}") from None


def _json_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ResumeError(f"{STATE_FILE} holds {value!r} where an integer belongs")
    return value


def _check_state(state: _State, config: ViTConfig) -> None:
    """A saved state that the model can resume from: a plan (a token order starting with
    the prefix tokens, nested keep counts) whose blocks done are the deepest ones, with
    one log entry per slimmed block."""
    done = sorted(state.keep_counts)
    if done != list(range(config.depth - len(done), config.depth)) or not done:
        raise ResumeError(f"the blocks done, {[b + 1 for b in done]}, are not the deepest ones")
    try:
        _check_counts(config, state.plan(config).keep_counts)
    except ValueError as error:
        raise ResumeError(f"the saved plan does not fit the model: {error}") from None
    logged = sorted(entry.block - 1 for entry in state.log)
    if logged != done[:-1]:
        raise ResumeError(f"the log covers blocks {[b + 1 for b in logged]}, not the blocks done")


@torch.no_grad()
def _dense_features(teacher: nn.Module, images: Tensor, batch_size: int) -> list[Tensor]:
    """The dense model's tokens, original order: the embedding and every block's output,
    ``depth + 1`` tensors (M, N, C). Block l's input is ``[l]``, its output ``[l + 1]``."""
    features: list[Tensor] = []
    for start in range(0, images.shape[0], batch_size):
        x = teacher.embed(images[start : start + batch_size])
        stages = [x]
        for block in teacher.blocks:
            x = block(x)
            stages.append(x)
        if not features:
            features = [x.new_empty((images.shape[0], *x.shape[1:])) for x in stages]
        for stored, stage in zip(features, stages, strict=True):
            stored[start : start + stage.shape[0]] = stage
    return features


@torch.no_grad()
def _block_scores(
    student: nn.Module,
    inputs: Tensor,
    block: int,
    counts: Sequence[int],
    method: str,
    generator: torch.Generator,
    batch_size: int,
) -> Tensor:
    """Scores (N,) of block ``block``'s tokens in the run's prefix order, from its cached
    input ``inputs`` (M, N, C) (prefix order) through blocks ``block`` … L of the
    partially slimmed model (block ``block`` updating every token, those above their
    ``counts``)."""
    config = student.config
    accumulator = ScoreAccumulator(config.num_tokens, method, generator=generator)
    for start in range(0, inputs.shape[0], batch_size):
        z_in = inputs[start : start + batch_size]
        x, maps = z_in, []
        for b in range(block, config.depth):
            x, probs = pruned_block(student.blocks[b], x, counts[b], return_attention=True)
            maps.append(probs)
        accumulator.update(maps, z_in, counts[block + 1 :])
    if method != "random":
        accumulator.total = all_reduce_sum(accumulator.total)
        accumulator.count = int(all_reduce_sum(torch.tensor([accumulator.count])).item())
    return accumulator.scores()


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


def _cloned_state(module: nn.Module) -> dict[str, Tensor]:
    """A copy of ``module``'s state that later updates of the module leave alone."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


_History = tuple[tuple[int, int], ...]  # (block, keep count) of the decisions taken so far


class _Slimmer:
    """Runs Algorithm 1 top-down, possibly several times (the eps search), reusing what
    does not depend on eps: the dense features, and — keyed by the decisions taken
    before them — every block's scores and every tuning step's weights and error, so a
    run that retraces an earlier run's decisions replays them instead of recomputing."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        images: Tensor,
        settings: SlimSettings,
        run: _RunDirectory | None,
        progress: bool,
        on_block_end: Callable[[BlockLog], None] | None,
    ) -> None:
        self.student = student
        self.settings = settings
        self.run_dir = run
        self.progress = progress
        self.on_block_end = on_block_end
        self.config = student.config
        self.dense_weights = copy.deepcopy(student.state_dict())
        self.features = _dense_features(teacher, images, settings.batch_size)
        self.score_count = (
            images.shape[0]
            if settings.score_size is None
            else -(-settings.score_size // process_group()[1])
        )
        self.scores: dict[_History, Tensor] = {}
        self.steps: dict[_History, tuple[float, dict[str, Tensor]]] = {}
        self.search: list[SearchLog] = []

    def forget_except(self, histories: Sequence[set[_History]]) -> None:
        """Drop the replay entries of runs other than ``histories`` (memory)."""
        keep = set().union(*histories)
        self.scores = {key: value for key, value in self.scores.items() if key in keep}
        self.steps = {key: value for key, value in self.steps.items() if key in keep}

    def run(
        self,
        tolerance: tuple[float, ...] | None,
        targets: Sequence[int] | None,
        resume: _Saved | None,
        visited: set[_History],
    ) -> _State:
        """One top-down pass with ``tolerance`` (eps per block, 0-indexed, the last block
        excepted) or keep counts ``targets``, from ``resume`` if given; adds the replay
        keys it used to ``visited``."""
        config, settings, student = self.config, self.settings, self.student
        student.load_state_dict(self.dense_weights)
        if resume is not None:
            student.load_state_dict(resume.weights, strict=False)  # exactly the tuned blocks
            state = resume.state
            shallowest = min(state.keep_counts) + 1
            if shallowest > 1:
                logger.info(
                    "resuming from %s: blocks %d-%d are done", self.run_dir.path, shallowest,
                    config.depth,
                )  # fmt: skip
        else:
            state = _State.initial(config)
        history: _History = tuple(
            (block, state.keep_counts[block]) for block in sorted(state.keep_counts)[::-1][1:]
        )
        label = (
            "slimming"
            if tolerance is None or settings.eps is not None
            else f"slimming, {describe_eps(tolerance)}"
        )
        rank = process_group()[0]
        steps = tqdm(desc=label, unit="step", disable=not self.progress or rank != 0, leave=False)
        try:
            for block in range(config.depth - 2, -1, -1):
                if block in state.keep_counts:
                    continue
                eps = None if tolerance is None else tolerance[block]
                history = self._slim_block(block, state, history, eps, targets, steps, visited)
                if self.run_dir is not None and rank == 0:
                    self.run_dir.save(self.search, tolerance, state, student)
                if process_group()[1] > 1:
                    dist.barrier()
                if self.on_block_end is not None:
                    self.on_block_end(state.log[-1])
        finally:
            steps.close()
        return state

    def _slim_block(
        self,
        block: int,
        state: _State,
        history: _History,
        eps: float | None,
        targets: Sequence[int] | None,
        steps: tqdm,
        visited: set[_History],
    ) -> _History:
        config, settings, student = self.config, self.settings, self.student
        start = time.perf_counter()
        entry = BlockLog(block=block + 1, kept=0)
        counts = state.counts(config)
        order = torch.tensor(state.token_order)
        visited.add(history)
        if history not in self.scores:
            generator = torch.Generator().manual_seed(settings.seed * 7919 + block)
            inputs = self.features[block][: self.score_count, order]
            self.scores[history] = _block_scores(
                student, inputs, block, counts, settings.score, generator, settings.batch_size
            )
        scores = self.scores[history]
        if not bool(torch.isfinite(scores).all()):
            raise NonFiniteError(f"block {block + 1}: the patch scores are not finite")
        # Candidates follow the kept tokens in score order: adding k tokens is n += k.
        kept = state.kept
        ranked = kept + torch.argsort(-scores[kept:], stable=True)
        order = torch.cat((order[:kept], order[ranked]))
        state.token_order = order.tolist()
        inputs, targets_z = self.features[block][:, order], self.features[block + 2][:, order]
        n = kept if targets is None else max(kept, targets[block])
        step = 0
        while True:
            counts[block] = n
            key = (*history, (block, n))
            visited.add(key)
            if key in self.steps:
                error, weights = self.steps[key]
                student.blocks[block].load_state_dict(weights)
            else:
                # E with the weights the step starts from, and after tuning: a tuning that
                # raised E is undone (docs/design.md §6.2).
                weights = _cloned_state(student.blocks[block])
                error = _relative_error(
                    student, block, inputs, targets_z, counts, settings.batch_size
                )
                if settings.block_epochs > 0:
                    _tune_block(
                        student, block, inputs, targets_z, counts,
                        epochs=settings.block_epochs, batch_size=settings.batch_size,
                        lr=settings.lr, seed=settings.seed * 104729 + block * 1009 + step,
                    )  # fmt: skip
                    tuned_error = _relative_error(
                        student, block, inputs, targets_z, counts, settings.batch_size
                    )
                    if tuned_error <= error:
                        error, weights = tuned_error, _cloned_state(student.blocks[block])
                    else:
                        student.blocks[block].load_state_dict(weights)
                self.steps[key] = (error, weights)
            if not math.isfinite(error):
                raise NonFiniteError(
                    f"block {block + 1}, step {step + 1}: the reconstruction error E is {error}; "
                    "stopped there (blocks finished before are kept in the run directory)"
                )
            entry.errors.append(error)
            entry.kept_per_step.append(n)
            steps.update()
            steps.set_postfix(block=block + 1, kept=n, E=f"{error:.4f}")
            if eps is None:
                break
            entry.eps = eps
            entry.reached_eps = error <= eps
            if entry.reached_eps or n == config.num_tokens:
                break
            n = min(config.num_tokens, n + settings.r)
            step += 1
        entry.kept = n
        entry.seconds = time.perf_counter() - start
        state.keep_counts[block] = n
        state.log.append(entry)
        return (*history, (block, n))


def _flops_reduction(config: ViTConfig, state: _State) -> float:
    return 1.0 - flops_of(config, state.counts(config)) / flops_of(config)


def _blend(low: float, high: float, position: float, blocks: int) -> tuple[float, ...]:
    """Per-block tolerances between two uniform ones (docs/design.md §8), indexed by
    block: the ⌊position⌋ deepest of the ``blocks`` tuned blocks hold ``high``, the next
    one ``low^(1-f)·high^f`` (f the fractional part of ``position``), the others ``low``.
    Position 0 is ``low`` everywhere, position ``blocks`` is ``high`` everywhere."""
    whole = math.floor(position)
    fraction = position - whole
    deepest_first = [
        high if k < whole else low ** (1 - fraction) * high**fraction if k == whole else low
        for k in range(blocks)
    ]
    return tuple(deepest_first[::-1])


def _search_eps(
    slimmer: _Slimmer, target: float, saved: _Saved | None
) -> tuple[tuple[float, ...], _State]:
    """The tolerance whose run removes ``target`` of the FLOPs within
    ``FLOPS_TOLERANCE`` (docs/design.md §8). One eps for every block first: bracketed by
    factors of 4 from 0.01 (downwards at once to just below the largest error a run
    accepted, where that is smaller), then bisected in log space. Where the FLOPs jump
    between two close eps, the deeper blocks take the larger eps and the shallower the
    smaller, the split bisected along :func:`_blend`. Runs recorded in ``saved`` are not repeated.
    Returns the tolerance and its run's state (the closest run, with a warning, if none is
    within tolerance)."""
    config = slimmer.config
    blocks = config.depth - 1
    tried = {tuple(entry.block_eps): entry for entry in saved.search} if saved else {}
    slimmer.search = list(saved.search) if saved else []
    runs: dict[tuple[float, ...], tuple[_State, set[_History]]] = {}

    def perform(tolerance: tuple[float, ...]) -> _State:
        resume = saved if saved is not None and saved.tolerance == tolerance else None
        visited: set[_History] = set()
        state = slimmer.run(tolerance, None, resume, visited)
        runs[tolerance] = (state, visited)
        return state

    def reduction(tolerance: tuple[float, ...]) -> float:
        if tolerance not in tried:
            state = perform(tolerance)
            accepted = [entry.errors[-1] for entry in state.log if entry.reached_eps]
            entry = SearchLog(
                list(tolerance), _flops_reduction(config, state), max(accepted, default=0.0)
            )
            tried[tolerance] = entry
            slimmer.search.append(entry)
            logger.info(
                "%s: %.1f%% fewer FLOPs (target %.1f%%)",
                describe_eps(tolerance), 100 * entry.flops_reduction, 100 * target,
            )  # fmt: skip
        return tried[tolerance].flops_reduction

    def below_accepted(eps: float) -> float:
        """Just below the largest error the run at ``eps`` accepted: the largest eps that
        changes one of its decisions. On an easy model, whose errors are far below eps,
        the search goes there in one run instead of many divisions by 4."""
        largest = tried[(eps,) * blocks].largest_accepted_error
        return 0.99 * largest if largest > 0 else math.inf

    def keep_only(*tolerances: tuple[float, ...]) -> None:
        slimmer.forget_except([runs[t][1] for t in tolerances if t in runs])

    def landed(value: float) -> bool:
        return abs(value - target) <= FLOPS_TOLERANCE

    low = high = None  # one eps for every block, with too little / too much reduction
    eps = _EPS_START
    while len(slimmer.search) < SEARCH_RUNS:
        value = reduction((eps,) * blocks)
        if landed(value):
            break
        if value < target:
            low = eps
        else:
            high = eps
        if high is None:
            following = min(eps * 4, _EPS_HIGH)
        elif low is None:
            following = max(min(eps / 4, below_accepted(eps)), _EPS_LOW)
        else:
            following = math.sqrt(low * high)
        keep_only(*((e,) * blocks for e in (low, high) if e is not None))
        if following == eps or (low is not None and high is not None and high < _SPLIT_RATIO * low):
            break
        eps = following
    if low is not None and high is not None and not landed(value):
        below, above = 0.0, float(blocks)  # blend positions with too little / too much
        while len(slimmer.search) < SEARCH_RUNS and above - below > _BLEND_RESOLUTION:
            position = (below + above) / 2
            value = reduction(_blend(low, high, position, blocks))
            if landed(value):
                break
            if value < target:
                below = position
            else:
                above = position
            keep_only(*(_blend(low, high, p, blocks) for p in (below, above)))
    best = min(tried, key=lambda t: (abs(tried[t].flops_reduction - target), len(set(t)) > 1, t))
    if best in runs:
        return best, runs[best][0]
    return best, perform(best)  # known from the run directory: run it (again)


@torch.no_grad()
def _agreement(teacher: nn.Module, student: nn.Module, images: Tensor, batch_size: int) -> float:
    """Fraction of ``images`` (all processes) on which both models predict the same class."""
    totals = torch.zeros(2, dtype=torch.float64)
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        same = teacher(batch).argmax(-1) == student(batch).argmax(-1)
        totals += torch.tensor([same.sum().item(), same.numel()], dtype=torch.float64)
    same, count = all_reduce_sum(totals).tolist()
    return same / count


def slim(
    model: nn.Module,
    calib: Tensor | Dataset,
    settings: SlimSettings | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_block_end: Callable[[BlockLog], None] | None = None,
    **overrides: Any,
) -> SlimResult:
    """Algorithm 1: find every block's kept tokens top-down and tune each block.

    Args:
        model: the trained dense model (left unchanged; it is the reconstruction target):
            our :class:`~patchslim_ext.vit.VisionTransformer` or a timm ViT instance.
            Prefix tokens (class, distillation, registers) are kept in every block but
            the last, which keeps the tokens the head reads.
        calib: calibration images (M, in_chans, H, W), or a dataset of ``(image, label)``
            items from which ``settings.calib_size`` images are drawn (seeded).
        settings: :class:`~patchslim_ext.settings.SlimSettings` (default: remove 40% of
            the FLOPs, eps searched); ``overrides`` replace single fields, e.g.
            ``slim(model, images, flops_reduction=0.45)`` or ``slim(model, images, eps=0.01)``.
        run_dir: where the state is saved after every block; a rerun with the same
            model and settings resumes from it.
        on_block_end: called after each block is finished and saved.

    Returns:
        :class:`SlimResult`; ``result.model`` is a tuned copy of ``model`` with the plan set.

    Memory: the dense model's tokens after every block are kept for the calibration
    images, ``(depth + 1) · M · N · C`` values (DeiT-S, 1,024 images: 4 GB in float32);
    a FLOP target also keeps one block's weights per tuning step of the runs it
    brackets eps with.
    """
    settings = (settings or SlimSettings()).replace(**overrides)
    teacher = prunable(copy.deepcopy(model)).eval().requires_grad_(False)
    student = prunable(copy.deepcopy(model)).eval().requires_grad_(False)
    config = teacher.config
    if config.depth < 2:
        raise UsageError("slimming needs at least two blocks")
    targets = _target_counts(config, settings)
    rank, world = process_group()

    if isinstance(calib, Tensor):
        images = calib
    else:
        available = len(calib)  # type: ignore[arg-type]
        count = min(settings.calib_size or available, available)
        if count < (settings.calib_size or 0):
            logger.info(
                "calibrating on all %d images of the data (calib_size %d asks for more)",
                available, settings.calib_size,
            )  # fmt: skip
        images = take_images(calib, count, settings.seed)
    expected = (config.in_chans, config.img_size, config.img_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
        raise UsageError(
            f"calibration images must have shape (M, {', '.join(map(str, expected))}), "
            f"got {tuple(images.shape)}"
        )
    shard = -(-images.shape[0] // world)
    images = images[rank * shard : (rank + 1) * shard].to(next(model.parameters()).device)

    fingerprint = {
        **settings.to_dict(), "targets": targets, "calib": list(images.shape),
        "world": world, "config": config.to_dict(),
    }  # fmt: skip
    run = _RunDirectory(run_dir, _fingerprint(model, fingerprint)) if run_dir else None
    saved = run.load(student) if run is not None else None
    slimmer = _Slimmer(teacher, student, images, settings, run, progress, on_block_end)
    target = settings.target_reduction if settings.schedule == "tolerance" else None
    if target is not None:
        tolerance, state = _search_eps(slimmer, target, saved)
    else:
        tolerance = None if settings.eps is None else (settings.eps,) * (config.depth - 1)
        state = slimmer.run(tolerance, targets, saved, set())

    plan = state.plan(config)
    student.set_plan(plan)
    agreement = _agreement(teacher, student, images, settings.batch_size)
    student.requires_grad_(True)
    result = SlimResult(
        plan=plan, model=student, log=state.log, settings=settings,
        block_eps=None if tolerance is None else list(tolerance), search=slimmer.search,
        agreement=agreement, warnings=[],
    )  # fmt: skip
    for message in _warnings(result, target):
        logger.warning(message)
        result.warnings.append(message)
    return result


def _warnings(result: SlimResult, target: float | None) -> list[str]:
    """What a user must hear about a result: blocks that did not reach eps, a FLOP target
    missed by the eps search (``target``), a slimmed model that no longer agrees with the
    dense one."""
    messages = [
        f"block {entry.block} did not reach eps {entry.eps:.4g}: E_(l+1) = "
        f"{entry.errors[-1]:.4g} with every token kept"
        for entry in sorted(result.log, key=lambda entry: entry.block)
        if entry.reached_eps is False
    ]
    if target is not None and abs(result.flops_reduction - target) > FLOPS_TOLERANCE:
        closest = result.flops_reduction
        messages.append(
            f"no eps reached the {100 * target:.0f}% FLOP target within "
            f"{100 * FLOPS_TOLERANCE:.0f} points: the closest, {describe_eps(result.block_eps)}, "
            f"removes {100 * closest:.1f}%; try another target, a smaller r, or schedule "
            "'uniform'"
        )
    if result.agreement < COLLAPSED_AGREEMENT:
        messages.append(
            f"the slimmed model agrees with the dense one on only "
            f"{100 * result.agreement:.1f}% of the calibration images: it has collapsed; "
            "slim less (a smaller FLOP reduction or eps) rather than fine-tune this"
        )
    return messages


def _target_counts(config: ViTConfig, settings: SlimSettings) -> list[int] | None:
    """The keep counts the uniform and fixed schedules aim for (None: tolerance)."""
    if settings.schedule == "tolerance":
        return None
    if settings.schedule == "uniform":
        return uniform_keep_counts(config, settings.target_reduction)
    try:
        return list(_check_counts(config, settings.keep_counts))
    except ValueError as error:
        raise UsageError(f"keep_counts {list(settings.keep_counts)}: {error}") from None
