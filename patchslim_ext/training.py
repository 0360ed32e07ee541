"""Training, fine-tuning with distillation, and evaluation.

Everything here runs in one process or under ``torchrun`` with DistributedDataParallel
(gloo on CPU, nccl on GPU; the caller initialises the process group, see
:func:`patchslim_ext.runtime.init_distributed`). Settings, with their defaults, are
:class:`~patchslim_ext.settings.TrainSettings` and
:class:`~patchslim_ext.settings.FinetuneSettings`. Batches are global: ``batch_size`` is
the batch of one optimiser step summed over all processes, and each process takes its slice of it
(:class:`~patchslim_ext.data.GlobalBatchSampler`), so W processes reproduce the single
process run up to floating-point summation order.

Distillation (DeiT-style, through the class token; our models have no distillation
token):

- ``"soft"``: ``(1 − α)·CE(s, y) + α·τ²·KL(softmax(t/τ) ‖ softmax(s/τ))``
- ``"hard"``: ``(1 − α)·CE(s, y) + α·CE(s, argmax t)`` (DeiT uses α = 0.5)
- ``"none"``: ``CE(s, y)``

where s and t are the student's and the teacher's logits, α = ``distill_weight``
and τ = ``temperature``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from patchslim_ext.data import GlobalBatchSampler, collate
from patchslim_ext.errors import NonFiniteError
from patchslim_ext.runtime import all_reduce_sum, process_group
from patchslim_ext.settings import FinetuneSettings, TrainSettings


@dataclass
class EpochLog:
    """One epoch: mean training loss over all processes, last learning rate, wall time
    and the images it trained on."""

    epoch: int
    loss: float
    lr: float
    seconds: float
    images: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def check_finite_step(loss: Tensor, params: Iterable[Tensor], where: str) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` if ``loss`` or a gradient of
    ``params`` is NaN or infinite on any process (call after ``backward``, and after the
    gradients are summed over processes, before the optimiser step)."""
    grads = [param.grad for param in params if param.grad is not None]
    loss_ok = bool(torch.isfinite(loss.detach()).all())
    grads_ok = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    bad = all_reduce_sum(torch.tensor([float(not loss_ok), float(not grads_ok)]))
    if bad.any():
        what = "the loss" if bad[0] else "a gradient"
        value = f" ({loss.item():.4g})" if not loss_ok else ""
        raise NonFiniteError(
            f"{where}: {what} is not finite{value}; stopped there, nothing was written "
            "(a lower learning rate may help)"
        )


def optimizer_step(optimizer: torch.optim.Optimizer, where: str) -> None:
    """``optimizer.step()``; a step too large for the parameters' dtype (torch refuses to
    convert the update's scalar) is a :class:`NonFiniteError` naming ``where``."""
    try:
        optimizer.step()
    except RuntimeError as error:
        if "without overflow" not in str(error):
            raise
        raise NonFiniteError(
            f"{where}: the optimiser step overflows the parameters' dtype; stopped there, "
            "nothing was written (a lower learning rate may help)"
        ) from None


def check_finite_parameters(module: nn.Module, where: str) -> None:
    """Raise :class:`NonFiniteError` if a parameter of ``module`` is NaN or infinite."""
    for name, param in module.named_parameters():
        if not bool(torch.isfinite(param.detach()).all()):
            raise NonFiniteError(
                f"{where}: parameter {name} is not finite; nothing was written "
                "(a lower learning rate may help)"
            )


def _apply_shifts(images: Tensor, shifts: Tensor, max_shift: int) -> Tensor:
    height, width = images.shape[-2:]
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    rows = (max_shift - shifts[:, 0]).tolist()
    cols = (max_shift - shifts[:, 1]).tolist()
    return torch.stack(
        [
            padded[i, :, top : top + height, left : left + width]
            for i, (top, left) in enumerate(zip(rows, cols, strict=True))
        ]
    )


def distillation_loss(
    logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None,
    mode: str,
    distill_weight: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """The training objective (see the module docstring); logits (B, K), labels (B,)."""
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if mode == "none":
        return ce
    if teacher_logits is None:
        raise ValueError(f"distillation={mode!r} needs the teacher's logits")
    if mode == "soft":
        kd = F.kl_div(
            F.log_softmax(logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        ) * (temperature**2)
    else:
        kd = F.cross_entropy(logits, teacher_logits.argmax(-1))
    return (1.0 - distill_weight) * ce + distill_weight * kd


def _loader(dataset: Dataset, sampler: GlobalBatchSampler, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)


def _learning_rate(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def train(
    model: nn.Module,
    data: Dataset,
    settings: TrainSettings | None = None,
    *,
    teacher: nn.Module | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[EpochLog], None] | None = None,
    **overrides: Any,
) -> list[EpochLog]:
    """Train ``model`` (a classifier of (B, C, H, W) images) with AdamW and a cosine schedule.

    Args:
        data: items ``(image, label)``; images (C, H, W) on the CPU. Every image is used
            every epoch (the last batch may be short; under ``torchrun`` it is cut to a
            multiple of the number of processes).
        settings: :class:`~patchslim_ext.settings.TrainSettings` (default: its defaults);
            ``overrides`` replace single fields, e.g. ``train(model, data, epochs=5)``.
        teacher: the model distilled from (frozen), needed unless
            ``settings.distillation == "none"``.
        on_epoch_end: called on every process after each epoch (e.g. to save).

    Returns one :class:`EpochLog` per epoch. The model is updated in place.
    """
    settings = (settings or TrainSettings()).replace(**overrides)
    if settings.distillation != "none" and teacher is None:
        raise ValueError(f"distillation={settings.distillation!r} needs a teacher model")
    rank, world = process_group()
    device = next(model.parameters()).device
    sampler = GlobalBatchSampler(
        len(data),
        settings.batch_size,
        shuffle=True,
        seed=settings.seed,
        equal_shares=True,
        rank=rank,
        world_size=world,
    )
    loader = _loader(data, sampler, settings.num_workers)
    wrapped = DistributedDataParallel(model) if world > 1 else model
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )
    epochs, max_shift = settings.epochs, settings.max_shift
    total_steps = epochs * len(sampler)
    warmup_steps = round(settings.warmup_epochs * len(sampler))
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    logs = []
    step = 0
    current_lr = settings.lr
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not progress or rank != 0,
            leave=False,
            unit="batch",
        )
        for batch, (images, labels) in enumerate(bar):
            if max_shift:
                # Shifts are drawn for the whole global batch, then sliced, so that the
                # augmentation does not depend on the number of processes.
                local = images.shape[0]
                generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
                shifts = torch.randint(
                    -max_shift, max_shift + 1, (local * world, 2), generator=generator
                )
                images = _apply_shifts(images, shifts[rank * local : (rank + 1) * local], max_shift)
            images, labels = images.to(device), labels.to(device)
            current_lr = _learning_rate(
                step, total_steps, warmup_steps, settings.lr, settings.min_lr
            )
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            teacher_logits = None
            if teacher is not None and settings.distillation != "none":
                with torch.no_grad():
                    teacher_logits = teacher(images)
            loss = distillation_loss(
                wrapped(images),
                labels,
                teacher_logits,
                settings.distillation,
                settings.distill_weight,
                settings.temperature,
                settings.label_smoothing,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            where = f"epoch {epoch + 1}, step {batch + 1}/{len(sampler)}"
            check_finite_step(loss, model.parameters(), where)
            optimizer_step(optimizer, where)
            loss_sum += torch.tensor([loss.item() * labels.numel(), labels.numel()])
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{current_lr:.2e}")
            step += 1
        loss_sum = all_reduce_sum(loss_sum)
        log = EpochLog(
            epoch=epoch + 1,
            loss=float(loss_sum[0] / loss_sum[1]),
            lr=current_lr,
            seconds=time.perf_counter() - start,
            images=int(loss_sum[1]),
        )
        logs.append(log)
        if on_epoch_end is not None:
            on_epoch_end(log)
    check_finite_parameters(model, f"after epoch {epochs}")
    model.eval()
    return logs


def finetune(
    slimmed: nn.Module,
    teacher: nn.Module,
    data: Dataset,
    settings: FinetuneSettings | None = None,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[EpochLog], None] | None = None,
    **overrides: Any,
) -> list[EpochLog]:
    """Fine-tune a slimmed network (a model with its plan set) with
    cross-entropy plus distillation from the dense ``teacher`` (module docstring).

    Single process or under ``torchrun`` (DDP); settings are
    :class:`~patchslim_ext.settings.FinetuneSettings` (or ``overrides`` of its fields);
    see :func:`train`. The slimmed model's parameters are updated in place.
    """
    settings = (settings or FinetuneSettings()).replace(**overrides)
    return train(
        slimmed,
        data,
        settings,
        teacher=teacher,
        progress=progress,
        on_epoch_end=on_epoch_end,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, *, batch_size: int = 250, progress: bool = False
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over ``data``, all processes together."""
    rank, world = process_group()
    device = next(model.parameters()).device
    sampler = GlobalBatchSampler(
        len(data), batch_size * world, shuffle=False, rank=rank, world_size=world
    )
    totals = torch.zeros(3, dtype=torch.float64)
    model.eval()
    for images, labels in tqdm(
        _loader(data, sampler, 0),
        desc="eval",
        disable=not progress or rank != 0,
        leave=False,
        unit="batch",
    ):
        if labels.numel() == 0:
            continue
        logits = model(images.to(device)).float().cpu()
        totals += torch.tensor(
            [
                (logits.argmax(-1) == labels).sum().item(),
                F.cross_entropy(logits, labels, reduction="sum").item(),
                labels.numel(),
            ],
            dtype=torch.float64,
        )
    correct, loss, count = all_reduce_sum(totals).tolist()
    return {"top1": 100.0 * correct / count, "loss": loss / count, "images": int(count)}
