"""Importance: how a method ranks the parts of a unit; pluggable and registered by name.

Like Torch-Pruning's importance classes, an :class:`Importance` turns a unit into
scores, one per part, higher meaning keep. A method holds one as an object
(``UnstructuredMethod("l1_unstructured", "l1")``), so a new criterion is a new
importance, not a new subclass of every method. A :class:`Unit` is scored in one
of three shapes:

* **weights** (:meth:`Unit.weights`): every element of a layer's weight is a part;
  the scores have the weight's shape (unstructured pruning);
* **blocks** (:meth:`Unit.blocks`): part ``i`` is the ``i``-th of ``count`` equal
  blocks of each parameter along its dimension: rows of the q/k/v (up/gate)
  projections, columns of the output (down) projection (attention heads,
  feed-forward neurons);
* **a channel group** (``group``): a Torch-Pruning dependency group, the output
  channels of a group root and everything coupled to them; scored by the
  matching Torch-Pruning group importance (mean over the group's layers).

Registered importances (:func:`get_importance`):

``l1`` / ``l2``
    Magnitude (:class:`Magnitude`): ``|w|`` / ``w**2`` per weight, the L1 / L2 norm of
    a block's parameters, Torch-Pruning's ``GroupMagnitudeImportance(p)`` per channel.
``taylor``
    First-order Taylor ``|w * dL/dw|`` over ``context.calibration_batches`` (eval mode):
    summed per batch for weights and blocks, from the gradients summed over the batches
    for channel groups (Torch-Pruning's ``GroupTaylorImportance``).
``bn_scale``
    BatchNorm scale ``|gamma|`` (network slimming); channel groups with BatchNorm only.
``random``
    Uniform random scores from torch's global generator (reproducible under ``torch.manual_seed``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from torch import nn

from ..errors import AutopruneError, ConfigError
from ._common import batch_gradients
from .base import PruneContext


@dataclass(frozen=True, eq=False)
class Unit:
    """What an importance scores: the parts of one unit called ``name``.

    ``params``: ``(tensor, dim)`` pairs; with ``dim=None`` (a single weight) every
    element is a part, otherwise part ``i`` is the ``i``-th of ``count`` equal blocks
    along ``dim``. ``group``: the Torch-Pruning group of a channel unit (``params``
    is then empty).
    """

    name: str
    count: int
    params: tuple[tuple[torch.Tensor, int | None], ...] = ()
    group: Any = None

    @classmethod
    def weights(cls, name: str, module: nn.Module) -> Unit:
        """Every weight of ``module`` as a part."""
        return cls(name, module.weight.numel(), ((module.weight, None),))

    @classmethod
    def blocks(
        cls, name: str, count: int, rows: Sequence[nn.Linear | None], columns: Sequence[nn.Linear]
    ) -> Unit:
        """``count`` parts made of equal blocks of the rows (weight and bias) of ``rows``
        and of the columns of ``columns``' weights."""
        params: list[tuple[torch.Tensor, int | None]] = []
        for linear in rows:
            if linear is not None:
                params.append((linear.weight, 0))
                if linear.bias is not None:
                    params.append((linear.bias, 0))
        params.extend((linear.weight, 1) for linear in columns)
        return cls(name, count, tuple(params))

    @property
    def elementwise(self) -> bool:
        return self.group is None and len(self.params) == 1 and self.params[0][1] is None


class Importance(abc.ABC):
    """Scores the parts of units; higher means keep.

    Subclasses set ``name`` and implement :meth:`scores`; :meth:`prepare` is an
    optional hook run once before the units of one pruning step are scored.
    """

    name: str
    #: Only channel groups that contain a BatchNorm can be scored.
    needs_batchnorm: ClassVar[bool] = False
    #: Needs gradients from ``context.calibration_batches``.
    needs_calibration: ClassVar[bool] = False

    def prepare(self, model: nn.Module, units: Sequence[Unit], context: PruneContext) -> None:
        """Called once before ``units`` are scored (gradient importances backpropagate here)."""
        return None

    @abc.abstractmethod
    def scores(self, unit: Unit, context: PruneContext) -> torch.Tensor:
        """One score per part of ``unit``: the weight's shape for weights, ``[count]`` otherwise."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def block_sums(unit: Unit, values: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``[count]``: for each part, the sum of ``values(tensor)`` over its blocks of every parameter."""
    total: torch.Tensor | None = None
    for tensor, dim in unit.params:
        if dim is None:
            raise AutopruneError(f"unit {unit.name!r}: a per-weight unit has no blocks")
        x = values(tensor)
        per_index = x.movedim(dim, 0).reshape(x.shape[dim], -1).sum(dim=1)
        part = per_index.view(unit.count, -1).sum(dim=1)
        total = part if total is None else total + part
    if total is None:
        raise AutopruneError(f"unit {unit.name!r} has no parameters to score")
    return total


class Magnitude(Importance):
    """``|w|**p`` per weight, the Lp norm of each block, Torch-Pruning's group magnitude per channel."""

    def __init__(self, p: int) -> None:
        self.p = p
        self.name = f"l{p}"
        self._group = tp.importance.GroupMagnitudeImportance(p=p)

    def scores(self, unit: Unit, context: PruneContext) -> torch.Tensor:
        if unit.group is not None:
            return self._group(unit.group)
        if unit.elementwise:
            weight = unit.params[0][0].detach().abs()
            return weight if self.p == 1 else weight.pow(self.p)
        total = block_sums(unit, lambda t: t.detach().float().abs().pow(self.p))
        return total.sqrt() if self.p == 2 else total.pow(1.0 / self.p)

    def __repr__(self) -> str:
        return f"Magnitude(p={self.p})"


class Taylor(Importance):
    """First-order Taylor ``|w * dL/dw|``: per-batch terms summed for weights and blocks
    (each batch's gradient on its own); the gradients summed over the batches for channel
    groups (left in ``.grad`` for Torch-Pruning; the method clears them after cutting)."""

    name = "taylor"
    needs_calibration = True

    def __init__(self) -> None:
        self._group = tp.importance.GroupTaylorImportance()
        self._sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare(self, model: nn.Module, units: Sequence[Unit], context: PruneContext) -> None:
        self._sums = {}
        if any(unit.group is not None for unit in units):
            for _ in batch_gradients(model, context, self.name, accumulate=True):
                pass
            return
        params = {id(tensor): tensor for unit in units for tensor, _ in unit.params}
        sums = {key: torch.zeros_like(tensor, dtype=torch.float32) for key, tensor in params.items()}
        for _ in batch_gradients(model, context, self.name):
            for key, tensor in params.items():
                if tensor.grad is not None:
                    sums[key] += (tensor.detach() * tensor.grad).abs().float()
        model.zero_grad(set_to_none=True)
        self._sums = {key: (params[key], total) for key, total in sums.items()}

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        entry = self._sums.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            raise AutopruneError("taylor importance: prepare() was not run for this unit")
        return entry[1]

    def scores(self, unit: Unit, context: PruneContext) -> torch.Tensor:
        if unit.group is not None:
            return self._group(unit.group)
        if unit.elementwise:
            return self._sum(unit.params[0][0])
        return block_sums(unit, self._sum)


class BNScale(Importance):
    """BatchNorm scale ``|gamma|`` of each channel (network slimming)."""

    name = "bn_scale"
    needs_batchnorm = True

    def scores(self, unit: Unit, context: PruneContext) -> torch.Tensor:
        if unit.group is None:
            raise AutopruneError(f"bn_scale importance scores BatchNorm channels only, not unit {unit.name!r}")
        return tp.importance.BNScaleImportance()(unit.group)


class Random(Importance):
    """Uniform random scores from torch's global generator."""

    name = "random"

    def scores(self, unit: Unit, context: PruneContext) -> torch.Tensor:
        if unit.group is not None:
            return tp.importance.RandomImportance()(unit.group)
        if unit.elementwise:
            weight = unit.params[0][0]
            return torch.rand(weight.shape, device=weight.device)
        return torch.rand(unit.count)


_IMPORTANCES: dict[str, Callable[[], Importance]] = {}


def register_importance(name: str, factory: Callable[[], Importance]) -> None:
    """Make ``factory()`` available as the importance called ``name``."""
    if name in _IMPORTANCES and _IMPORTANCES[name] is not factory:
        raise ValueError(f"importance name {name!r} is registered twice")
    _IMPORTANCES[name] = factory


def known_importances() -> list[str]:
    """All registered importance names, sorted."""
    return sorted(_IMPORTANCES)


def get_importance(importance: str | Importance) -> Importance:
    """A fresh importance called ``importance`` (an :class:`Importance` is returned as is)."""
    if isinstance(importance, Importance):
        return importance
    try:
        factory = _IMPORTANCES[importance]
    except KeyError:
        raise ConfigError(
            f"unknown importance {importance!r}; known importances: {', '.join(known_importances())}"
        ) from None
    return factory()


def prepare(
    method: str, importance: Importance, model: nn.Module, units: Sequence[Unit], context: PruneContext
) -> None:
    """``importance.prepare``, after checking that a gradient importance has calibration data
    (the error names ``method``, the name users put in the config)."""
    if importance.needs_calibration and not context.calibration_batches:
        raise AutopruneError(
            f"{method} scores by {importance.name} importance, which needs gradients from calibration "
            "batches, but context.calibration_batches is empty; configure calibration batches or pick a "
            "magnitude method"
        )
    importance.prepare(model, units, context)


register_importance("l1", lambda: Magnitude(1))
register_importance("l2", lambda: Magnitude(2))
register_importance("taylor", Taylor)
register_importance("bn_scale", BNScale)
register_importance("random", Random)
