"""The contract every pruning method fulfils.

A method is one small object, registered by name (see :mod:`.registry`). Two of
its methods are abstract: which units of a model it can prune
(:meth:`PruningMethod.candidates`) and how to prune a set of them at given ratios
(:meth:`PruningMethod.prune`, which reports what it removed). Optional hooks,
with defaults, describe methods that remove whole, numbered parts of a unit
(channels, heads, neurons: ``indexed = True``): how many parts a unit has
(:meth:`~PruningMethod.unit_size`), how many a ratio removes
(:meth:`~PruningMethod.removal_count`) and how to remove given parts again
(:meth:`~PruningMethod.replay`). Iterative schedules and rewinding
(:mod:`autoprune.schedule`) use these hooks and nothing else.

How the parts of a unit are ranked is not a method's subclass but a pluggable
:class:`~.importance.Importance` object (l1, l2, taylor, bn_scale, random).
Scoring and surgery may be delegated to Torch-Pruning; planning (which unit,
how much) is the search space's business, not the method's.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from ..errors import AutopruneError

Family = Literal["removal", "structured", "unstructured"]

#: Order in which families are applied inside one trial: remove blocks first,
#: then shrink shapes, then mask what is left.
FAMILY_ORDER: tuple[Family, ...] = ("removal", "structured", "unstructured")

Removed = dict[str, list[int]]
"""What one :meth:`PruningMethod.prune` call removed: unit name -> indices of its parts."""


@dataclass
class PruneContext:
    """What a method may need besides the model: inputs to trace the graph,
    a few labelled batches for gradient-based scores, and what to protect.

    ``protected`` holds module names whose outputs must keep their size (by
    default the classifier head). ``max_layer_sparsity`` caps the fraction of
    weights any single layer may lose, so no layer is emptied by accident.
    """

    example_inputs: torch.Tensor
    calibration_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
    protected: frozenset[str] = field(default_factory=frozenset)
    max_layer_sparsity: float = 0.98
    round_to: int | None = None


def check_ratio(method: str, unit: str, ratio: float, context: PruneContext) -> None:
    """Raise unless ``0 <= ratio < 1`` and ``ratio <= context.max_layer_sparsity``.

    The cap is never applied silently: a request above it is an error naming the
    unit, the ratio and the cap.
    """
    if not 0.0 <= ratio < 1.0:
        raise AutopruneError(f"{method}: ratio {ratio} for {unit!r} is outside [0, 1)")
    if ratio > context.max_layer_sparsity:
        raise AutopruneError(
            f"{method}: ratio {ratio} for {unit!r} exceeds max_layer_sparsity={context.max_layer_sparsity}; "
            "lower the requested sparsity or raise the cap"
        )


def count_to_remove(total: int, ratio: float, round_to: int | None = None) -> int:
    """Whole parts removed for ``ratio`` of ``total``: ``round(ratio * total)``.

    With ``round_to`` the kept count is rounded to the nearest multiple of
    ``round_to`` (ties towards removing more) and never below ``round_to``.
    Callers check the result against ``total`` (at least one part must stay).
    """
    remove = round(ratio * total)
    if round_to and round_to > 1 and remove > 0:
        keep = total - remove
        lower = keep - keep % round_to
        upper = lower + round_to
        keep = lower if keep - lower <= upper - keep or upper > total else upper
        remove = total - max(keep, min(round_to, total))
    return remove


class PruningMethod(abc.ABC):
    """Base class of all pruning methods.

    Subclasses set ``name`` (the registry key used in configs; a class attribute,
    or an instance attribute when one class serves several names with different
    importances) and ``family``, and implement :meth:`candidates` and
    :meth:`prune`. Constructors only store.
    """

    name: str
    family: ClassVar[Family]
    #: True when the method removes whole, numbered parts of its units (channels,
    #: heads, neurons): :meth:`prune` reports their indices and :meth:`unit_size`,
    #: :meth:`removal_count` and :meth:`replay` are implemented. Iterative schedules
    #: and rewinding support a structured method only when it is indexed.
    indexed: ClassVar[bool] = False

    @abc.abstractmethod
    def candidates(self, model: nn.Module, context: PruneContext) -> list[str]:
        """Names of the units (layers, dependency-group roots or blocks) this
        method can prune in ``model``, in a stable order, excluding protected ones."""

    @abc.abstractmethod
    def prune(self, model: nn.Module, targets: Mapping[str, float], context: PruneContext) -> Removed:
        """Prune ``model`` in place: unit name -> fraction to remove, in [0, 1).

        Must reach each requested ratio (up to rounding to whole channels or
        heads) or raise; never silently prune less than asked. Returns, for every
        requested unit, the indices of the parts removed, numbered as before the
        call (empty for ratio 0 and for units inside a removed block): channels of a
        group root, heads, hidden neurons, ``[0]`` for a removed block. Methods that
        change no shape (unstructured) return an empty dict.
        """

    def unit_size(self, model: nn.Module, unit: str) -> int | None:
        """How many parts ``unit`` has in ``model`` now (output channels of a group
        root, heads of an attention block, hidden neurons of a feed-forward pair);
        None when the method does not prune whole parts or ``unit`` is not one of its units."""
        return None

    def removal_count(self, size: int, ratio: float, context: PruneContext) -> int:
        """Parts :meth:`prune` removes for ``ratio`` of a unit with ``size`` parts:
        :func:`count_to_remove` with ``context.round_to``, at least one part kept."""
        return max(0, min(count_to_remove(size, ratio, context.round_to), size - 1))

    def replay(self, model: nn.Module, removed: Mapping[str, Sequence[int]], context: PruneContext) -> None:
        """Make in ``model`` the structural change that :meth:`prune` reported as
        ``removed`` (same units, same indices), whatever ``model``'s weights are:
        rewinding applies the surgery chosen on trained weights to early weights.

        The default refuses: a method that cannot repeat its surgery does not support rewinding.
        """
        raise AutopruneError(
            f"rewinding is not supported with pruning method {self.name!r}: it cannot repeat its surgery "
            "with given indices; set space.rewind: never"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
