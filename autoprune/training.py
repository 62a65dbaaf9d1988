"""The training loop shared by dense pre-training and per-trial fine-tuning (torch only).

Devices and precision: the loop runs where the model is (each batch is moved to the model's device as it is
read, ``non_blocking`` so that pinned batches copy asynchronously) and in ``TrainSettings.precision``
(``fp32``, or ``bf16`` / ``fp16`` under ``torch.autocast``; ``fp16`` with a gradient scaler). Which device a
trial uses is decided once, by :func:`resolve_device`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str, gpu_assigned: bool, field: str = "execution.device") -> torch.device:
    """The device a trial (or the dense model's pre-training and measuring) runs on.

    ``auto``: CUDA when this process was given a GPU (``gpu_assigned``: Ray assigned it one, or
    ``execution.gpus_per_trial > 0`` in-process) and torch sees CUDA, else CPU. ``cuda`` means index 0 of the
    visible devices: Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPU it assigned, so that is the trial's own.
    ``cuda`` without CUDA raises :class:`ConfigError` (the trial fails with that message) instead of silently
    training on the CPU.
    """
    if requested not in DEVICES:
        raise ConfigError(f"field {field!r}: expected one of {', '.join(DEVICES)}, got {requested!r}")
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise ConfigError(f"field {field!r}: 'cuda' needs CUDA, but torch.cuda.is_available() is False here "
                          f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use 'auto' or 'cpu', "
                          "or run the trials where a GPU is (execution.gpus_per_trial > 0)")
    if requested == "cuda" or (requested == "auto" and available and gpu_assigned):
        return torch.device("cuda")
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``batch`` on ``device`` (no copy if it is there already); asynchronous from pinned memory."""
    return batch.to(device, non_blocking=True)


def autocast(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """``torch.autocast`` for ``bf16`` / ``fp16`` on ``device``; nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def as_fp32(outputs: object) -> object:
    """Floating-point tensor outputs as fp32 (after autocast: losses and metrics in full precision); any other
    output (a tuple, a dict of a user's model) as it is."""
    return outputs.float() if isinstance(outputs, torch.Tensor) and outputs.is_floating_point() else outputs


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a wall-clock time covers it (nothing to do on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (autocast; ``fp16`` with a gradient scaler): see :func:`autocast`."""


def lm_logits(outputs: object) -> torch.Tensor:
    """The logits ``[B, L, V]`` of a causal LM's output: the tensor itself, or ``.logits`` of a Hugging Face
    ``ModelOutput`` (the trial calls ``model(input_ids)``, so a plain module returning logits works too)."""
    logits = getattr(outputs, "logits", outputs)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"a causal LM must return logits [batch, length, vocab] (or an object with .logits), "
                         f"got {list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    return logits


def causal_lm_nll(outputs: object, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed next-token negative log-likelihood, tokens counted): position ``t`` predicts ``targets[:, t+1]``
    (targets are the input ids, or labels with ``-100`` where nothing is predicted), as Hugging Face's
    ``labels=`` loss shifts them; computed in fp32."""
    logits = lm_logits(outputs)
    labels = targets[:, 1:].reshape(-1)
    nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels,
                                      ignore_index=-100, reduction="sum")
    return nll, int((labels != -100).sum())


def causal_lm_loss(outputs: object, targets: torch.Tensor) -> torch.Tensor:
    """``model.task: causal_lm``'s loss: the mean next-token cross-entropy over the counted tokens."""
    nll, tokens = causal_lm_nll(outputs, targets)
    return nll / max(tokens, 1)


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
    unstructured-pruned weights at zero. Batches go to the model's device as they are read; forward and
    loss run in ``settings.precision`` (the weights and optimizer state stay fp32; with ``fp16`` a
    ``GradScaler`` scales the loss, and a step whose gradients overflow is skipped). With
    ``settings.distill_weight > 0`` and a ``teacher`` (in eval mode, never changed), the loss is
    :func:`distillation_loss`. ``settings.lr_schedule`` steps once per batch over ``epochs x`` batches per epoch.
    """
    if settings.epochs == 0:
        return float("nan")
    task_loss = loss_fn or settings.loss_fn or nn.functional.cross_entropy
    classification = loss_fn is None and settings.loss_fn is None
    distill = teacher is not None and settings.distill_weight > 0
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], settings)
    scheduler = make_scheduler(optimizer, settings, loader)
    device = model_device(model)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
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
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, settings.precision):
                outputs = model(inputs)
                if distill:
                    with torch.no_grad():
                        teacher_outputs = teacher(inputs)
                    loss = distillation_loss(as_fp32(outputs), as_fp32(teacher_outputs), targets, task_loss,
                                             settings.distill_weight, settings.distill_temperature,
                                             classification=classification)
                else:
                    loss = task_loss(as_fp32(outputs), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
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
    device = model_device(model)
    try:
        with torch.no_grad():
            for inputs, _ in loader:
                if used >= batches:
                    break
                model(to_device(inputs, device))
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
