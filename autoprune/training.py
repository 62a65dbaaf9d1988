"""The training loop shared by dense pre-training and per-trial fine-tuning (torch only)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_batches: int | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """The task's loss ``(outputs, targets) -> scalar``; None: cross-entropy."""
    lr_schedule: str = "constant"
    """``constant``, ``cosine`` (to 0 over the run's steps) or ``onecycle`` (peak ``lr``), stepped per batch."""
    distill_weight: float = 0.0
    """Knowledge distillation from a teacher (the dense model): ``(1-w) * task + w * distillation``; 0: off."""
    distill_temperature: float = 4.0


def make_optimizer(params: Iterable[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; expected sgd, adam or adamw")


def train(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: TrainSettings,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    teacher: nn.Module | None = None,
) -> float:
    """Train ``model`` in place; return the mean loss of the last epoch.

    ``after_step`` runs after every optimizer step: fine-tuning uses it to keep
    unstructured-pruned weights at zero. With ``settings.distill_weight > 0`` and a ``teacher`` (in
    eval mode, never changed), the loss is :func:`distillation_loss`. ``settings.lr_schedule`` steps
    once per batch over ``epochs x`` batches per epoch.
    """
    if settings.epochs == 0:
        return float("nan")
    task_loss = loss_fn or settings.loss_fn or nn.functional.cross_entropy
    classification = loss_fn is None and settings.loss_fn is None
    distill = teacher is not None and settings.distill_weight > 0
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], settings)
    scheduler = make_scheduler(optimizer, settings, loader)
    if distill:
        teacher_was_training = teacher.training
        teacher.eval()
    model.train()
    last = float("nan")
    stepped = 0
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for step, (inputs, targets) in enumerate(loader):
            if settings.max_batches is not None and step >= settings.max_batches:
                break
            optimizer.zero_grad(set_to_none=True)
            outputs = model(inputs)
            if distill:
                with torch.no_grad():
                    teacher_outputs = teacher(inputs)
                loss = distillation_loss(outputs, teacher_outputs, targets, task_loss, settings.distill_weight,
                                         settings.distill_temperature, classification=classification)
            else:
                loss = task_loss(outputs, targets)
            loss.backward()
            optimizer.step()
            # the last batch used the schedule's last rate: stepping on would overrun OneCycleLR
            if scheduler is not None and stepped < scheduler.total_steps - 1:  # type: ignore[attr-defined]
                scheduler.step()
                stepped += 1
            if after_step is not None:
                after_step(model)
            total += float(loss.detach())
            count += 1
        last = total / max(count, 1)
    if distill:
        teacher.train(teacher_was_training)
    model.eval()
    return last


def distillation_loss(
    outputs: torch.Tensor,
    teacher_outputs: torch.Tensor,
    targets: torch.Tensor,
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weight: float,
    temperature: float,
    *,
    classification: bool = True,
) -> torch.Tensor:
    """``(1-w) * task_loss + w * soft``: for classification (the default cross-entropy task) ``soft`` is
    Hinton's ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over dim 1 (batch mean); for a user
    loss (``model.loss``: regression, or any other output) it is the MSE to the teacher's outputs."""
    if classification:
        soft = nn.functional.kl_div(
            nn.functional.log_softmax(outputs / temperature, dim=1),
            nn.functional.log_softmax(teacher_outputs / temperature, dim=1),
            reduction="batchmean", log_target=True,
        ) * temperature**2
    else:
        soft = nn.functional.mse_loss(outputs, teacher_outputs)
    if weight >= 1.0:
        return soft
    return (1.0 - weight) * task_loss(outputs, targets) + weight * soft


def steps_per_epoch(loader: Iterable[object], max_batches: int | None) -> int:
    """Optimizer steps in one epoch: ``len(loader)`` (counted once if it has no len), capped by ``max_batches``."""
    try:
        count = len(loader)  # type: ignore[arg-type]
    except TypeError:
        count = sum(1 for _ in loader)
    return count if max_batches is None else min(count, max_batches)


def make_scheduler(
    optimizer: torch.optim.Optimizer, settings: TrainSettings, loader: Iterable[object]
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-batch learning-rate schedule of ``settings.lr_schedule`` (None for ``constant``); its
    ``total_steps`` attribute is the run's step count (the schedule is not stepped past it)."""
    if settings.lr_schedule == "constant":
        return None
    total = max(1, settings.epochs * steps_per_epoch(loader, settings.max_batches))
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if settings.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    elif settings.lr_schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=total)
    else:
        raise ValueError(f"unknown lr_schedule {settings.lr_schedule!r}; expected constant, cosine or onecycle")
    scheduler.total_steps = total  # type: ignore[attr-defined]
    return scheduler


def recalibrate_batchnorm(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], batches: int
) -> int:
    """Re-estimate every BatchNorm's running mean and variance from ``batches`` training batches (forward
    passes in train mode with ``momentum=None``, i.e. a plain average over the batches, no gradients):
    after pruning, the dense model's statistics no longer describe the pruned layers' inputs. Returns the
    batches used; the model is left in eval mode, its weights untouched."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    used = 0
    try:
        with torch.no_grad():
            for inputs, _ in loader:
                if used >= batches:
                    break
                model(inputs)
                used += 1
    finally:
        for m, momentum, (mean, var, tracked) in zip(norms, momenta, saved, strict=True):
            m.momentum = momentum
            if used == 0:  # an empty loader: keep the old statistics rather than reset ones
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
        model.eval()
    return used
