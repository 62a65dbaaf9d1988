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
) -> float:
    """Train ``model`` in place; return the mean loss of the last epoch.

    ``after_step`` runs after every optimizer step: fine-tuning uses it to keep
    unstructured-pruned weights at zero.
    """
    if settings.epochs == 0:
        return float("nan")
    loss_fn = loss_fn or settings.loss_fn or nn.functional.cross_entropy
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], settings)
    model.train()
    last = float("nan")
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for step, (inputs, targets) in enumerate(loader):
            if settings.max_batches is not None and step >= settings.max_batches:
                break
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(model)
            total += float(loss.detach())
            count += 1
        last = total / max(count, 1)
    model.eval()
    return last
