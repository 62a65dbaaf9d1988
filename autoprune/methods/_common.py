"""Helpers shared by the pruning methods: error messages, module lookup and
replacement, removed blocks, training-mode bookkeeping and calibration gradients."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import AutopruneError, ConfigError, UnsupportedLayerError
from .base import PruneContext

EXCLUDE_HINT = "add it to space.exclude in the config"


def unknown_unit(
    method: str, model: nn.Module, unit: str, candidates: list[str], reason: str | None = None
) -> AutopruneError:
    """The error for a target that is not one of ``candidates``.

    An existing module becomes :class:`UnsupportedLayerError` (with ``reason`` and
    how to exclude it); a name that is not in the model is a :class:`ConfigError`.
    """
    modules = dict(model.named_modules())
    if unit in modules:
        why = reason or f"{type(modules[unit]).__name__} is not a unit {method} can prune"
        return UnsupportedLayerError(
            f"{method} cannot prune layer {unit!r}: {why}; {EXCLUDE_HINT} or choose another method"
        )
    shown = ", ".join(candidates[:12]) + (" ..." if len(candidates) > 12 else "")
    return ConfigError(f"{method}: model has no module named {unit!r}; prunable units: {shown or 'none'}")


class RemovedBlock(nn.Identity):
    """Stands where ``remove_block`` took a block out: returns its first argument
    unchanged and ignores any other arguments (masks passed by a container)."""

    def forward(self, input: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return input


def removed_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks of ``model`` replaced by :class:`RemovedBlock`."""
    return [name for name, module in model.named_modules() if isinstance(module, RemovedBlock)]


def live_targets(model: nn.Module, targets: Mapping[str, float]) -> dict[str, float]:
    """``targets`` without units that lay inside a block already replaced by
    :class:`RemovedBlock` (removal runs first in a trial; those units are gone)."""
    removed = removed_blocks(model)
    return {
        unit: ratio
        for unit, ratio in targets.items()
        if not any(unit == block or unit.startswith(block + ".") for block in removed)
    }


def check_indices(method: str, unit: str, indices: Sequence[int], size: int) -> list[int]:
    """``indices`` sorted, after checking they are distinct parts of a unit with ``size`` parts
    and leave at least one (for ``replay``)."""
    drop = sorted({int(i) for i in indices})
    if len(drop) != len(indices) or len(drop) >= size or not all(0 <= i < size for i in drop):
        raise AutopruneError(f"{method}: cannot remove parts {list(indices)} of {unit!r}, which has {size}")
    return drop


def check_runs(method: str, model: nn.Module, context: PruneContext, units: list[str]) -> None:
    """One forward pass on ``context.example_inputs`` after surgery; a failure means
    a layer the method does not understand sat in a pruned unit."""
    if not units:
        return
    try:
        with preserved_modes(model), torch.no_grad():
            model.eval()
            model(context.example_inputs)
    except Exception as error:
        raise UnsupportedLayerError(
            f"{method}: the model no longer runs after pruning {', '.join(units)} ({type(error).__name__}: "
            f"{error}); a layer in these units is not supported: {EXCLUDE_HINT}"
        ) from error


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag on exit (tracing switches to eval)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def batch_gradients(
    model: nn.Module, context: PruneContext, method: str, accumulate: bool = False
) -> Iterator[int]:
    """Backpropagate ``context.loss_fn`` over each calibration batch, yielding after each one.

    With ``accumulate=False`` the ``.grad`` seen at each yield belongs to that
    batch alone; with ``accumulate=True`` it is the running sum. Runs in eval
    mode (BatchNorm statistics are left untouched) and clears earlier
    gradients first. Raises when there is no calibration data.
    """
    if not context.calibration_batches:
        raise AutopruneError(
            f"{method} scores weights by gradients and needs calibration batches, but "
            "context.calibration_batches is empty; configure calibration batches or pick a magnitude method"
        )
    model.zero_grad(set_to_none=True)
    with preserved_modes(model), torch.enable_grad():
        model.eval()
        for index, (inputs, labels) in enumerate(context.calibration_batches):
            if not accumulate:
                model.zero_grad(set_to_none=True)
            context.loss_fn(model(inputs), labels).backward()
            yield index
