"""Does the model fit the data? One forward pass, loss and metric on a real batch, before anything is
trained or written, so that a mismatch is one clear error instead of a traceback from the training loop."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import ConfigError
from .trial import Batches


def _shape(value: object) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def check_task(model: nn.Module, train_loader: Batches, val_loader: Batches,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
               metric_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, *,
               task: str = "classification") -> None:
    """Run the model on one validation and one training batch and compute the loss (``model.loss``,
    default cross-entropy) and the metric (``model.metric``, default top-1) on its outputs, so that a
    model whose outputs do not fit the data's targets (5 classes for 10 labels, no batch dimension)
    is a :class:`ConfigError` naming both factories and the shapes, before anything is trained or
    written. With ``task="causal_lm"`` the outputs must be logits ``[batch, length, vocab]`` (or carry them as
    ``.logits``) for labels ``[batch, length]`` of token ids below ``vocab`` (:func:`_check_lm`). The random
    number generator's state and the model's training flag are left as they were."""
    from .measure import top1

    loss_name = "model.loss" if loss_fn is not None else "the default loss (cross-entropy)"
    metric_name = "model.metric" if metric_fn is not None else "the default metric (top-1 accuracy)"
    was_training = model.training
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model.eval()
        try:
            for which, loader in (("validation", val_loader), ("training", train_loader)):
                inputs, targets = next(iter(loader))
                given = f"a {which} batch of data.factory (inputs {_shape(inputs)}, targets {_shape(targets)})"
                try:
                    outputs = model(inputs)
                except Exception as exc:
                    raise ConfigError(f"field 'model.factory': the model fails on {given}: "
                                      f"{type(exc).__name__}: {_first_line(exc)}") from None
                if task == "causal_lm":
                    _check_lm(outputs, targets, given, loss_fn)
                    continue
                batch = inputs.shape[0] if inputs.dim() else 0
                tensor_out = isinstance(outputs, torch.Tensor) and outputs.dim() > 0
                if not tensor_out and (loss_fn is None or metric_fn is None):  # the defaults need [batch, ...]
                    raise ConfigError(f"field 'model.factory': expected the model to return a tensor with a batch "
                                      f"dimension, got {_shape(outputs)} on {given}")
                if tensor_out and (outputs.shape[0] != batch or (targets.dim() and targets.shape[0] != batch)):
                    raise ConfigError(f"field 'model.factory': expected outputs and targets with the batch "
                                      f"dimension first ({batch}), got outputs {_shape(outputs)} on {given}")
                if tensor_out and loss_fn is None and not targets.is_floating_point() and targets.numel():
                    classes = outputs.shape[1] if outputs.dim() > 1 else 0
                    if int(targets.max()) >= classes or int(targets.min()) < 0:
                        raise ConfigError(
                            f"field 'model.factory': the model's outputs {_shape(outputs)} give {classes} classes, "
                            f"but {given} holds class labels from {int(targets.min())} to {int(targets.max())} "
                            f"(the default loss, cross-entropy, needs outputs [batch, classes]); fix the model's "
                            f"output size, or set model.loss and model.metric")
                _check_output_fn(loss_fn, nn.functional.cross_entropy, "model.loss", loss_name, outputs, targets,
                                 given, 1, "a scalar tensor")
                _check_output_fn(metric_fn, top1, "model.metric", metric_name, outputs, targets, given,
                                 batch, f"one score per sample ({batch})")
        finally:
            model.train(was_training)


def _check_lm(outputs: object, targets: torch.Tensor, given: str, loss_fn: Callable | None) -> None:
    """``model.task: causal_lm``: logits ``[B, L, V]`` against labels ``[B, L]`` in ``[0, V)`` (``-100``: not
    predicted), and the loss computes."""
    from .training import causal_lm_loss

    logits = getattr(outputs, "logits", outputs)
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 3 and targets.dim() == 2
            and tuple(logits.shape[:2]) == tuple(targets.shape)):
        raise ConfigError(f"field 'model.task': causal_lm expects the model to return logits [batch, length, vocab] "
                          f"(or an object with .logits) for labels [batch, length]; got outputs {_shape(logits)} on "
                          f"{given}")
    counted = targets[targets != -100]
    vocab = logits.shape[-1]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= vocab):
        raise ConfigError(f"field 'model.task': {given} holds token ids from {int(counted.min())} to "
                          f"{int(counted.max())}, but the model's logits give a vocabulary of {vocab}")
    name = "model.loss" if loss_fn is not None else "the causal-LM loss (shifted next-token cross-entropy)"
    _check_output_fn(loss_fn, causal_lm_loss, "model.loss", name, outputs, targets, given, 1, "a scalar tensor")


def _check_output_fn(fn: Callable | None, default: Callable, field: str, name: str, outputs: object,
                     targets: object, given: str, numel: int, expected: str) -> None:
    """Call the user's loss or metric (or its default) on real outputs; any failure names the field."""
    try:
        value = (fn or default)(outputs, targets)
        if not isinstance(value, torch.Tensor) or value.numel() != numel:
            raise ValueError(f"expected {expected}, got {_shape(value)}")
    except Exception as exc:
        raise ConfigError(f"field {field if fn is not None else 'model.factory'!r}: {name} of the model's outputs "
                          f"{_shape(outputs)} against the targets of {given} fails: {type(exc).__name__}: "
                          f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


