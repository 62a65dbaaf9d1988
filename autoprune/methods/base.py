"""The contract every pruning method fulfils.

A method is one small class, registered by name (see :mod:`.registry`). It knows
two things: which units of a model it can prune (:meth:`PruningMethod.candidates`)
and how to prune a set of them at given ratios (:meth:`PruningMethod.prune`).
Scoring and surgery may be delegated to Torch-Pruning; planning (which unit, how
much) is the search space's business, not the method's.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

Family = Literal["removal", "structured", "unstructured"]

#: Order in which families are applied inside one trial: remove blocks first,
#: then shrink shapes, then mask what is left.
FAMILY_ORDER: tuple[Family, ...] = ("removal", "structured", "unstructured")


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


class PruningMethod(abc.ABC):
    """Base class of all pruning methods.

    Subclasses set ``name`` (the registry key used in configs) and ``family``,
    and implement :meth:`candidates` and :meth:`prune`. Constructors only store.
    """

    name: ClassVar[str]
    family: ClassVar[Family]

    @abc.abstractmethod
    def candidates(self, model: nn.Module, context: PruneContext) -> list[str]:
        """Names of the units (layers, dependency-group roots or blocks) this
        method can prune in ``model``, in a stable order, excluding protected ones."""

    @abc.abstractmethod
    def prune(self, model: nn.Module, targets: Mapping[str, float], context: PruneContext) -> None:
        """Prune ``model`` in place: unit name -> fraction to remove, in [0, 1).

        Must reach each requested ratio (up to rounding to whole channels or
        heads) or raise; never silently prune less than asked.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
