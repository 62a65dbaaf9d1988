"""Magnitude N:M: the data-free baseline of the N:M methods.

``magnitude_2:4`` / ``magnitude_4:8`` zero the ``M - N`` smallest ``|W[i, j]|`` in every M consecutive weights
of a row (input dimension) of an ``nn.Linear``, no weight update: the pattern sparse tensor cores run, at the
fixed sparsity ``1 - N/M`` (0.5 for both). Candidates, the :class:`~.llm.FixedSparsityError` for any other
non-zero ratio and the record of the pattern (:func:`~.llm.semi_structured_layers`) are those of
``wanda_2:4`` / ``sparsegpt_2:4`` (see :mod:`.llm`), so the three are compared on the same layers.

Unlike them it needs no calibration batches: ``|W|`` is read from the weights alone, so its importance has
``needs_calibration = False`` and runs no capture pass; it is what Wanda and SparseGPT must beat under the
same pattern, and a way to get an N:M model when no data is at hand. Weights already zero score lowest, so
they count toward the pattern. There is no unstructured ``magnitude``: that is ``l1_unstructured``.
"""

from __future__ import annotations

import torch

from .base import PruneContext
from .importance import Importance, Unit
from .llm import PATTERNS, OneShotMethod
from .registry import register_method


class MagnitudeImportance(Importance):
    """``|W|`` per weight of a layer, from the weights alone (no calibration data)."""

    name = "magnitude"

    def scores(self, unit: Unit, context: PruneContext) -> torch.Tensor:
        return unit.params[0][0].detach().float().abs()


class MagnitudeNM(OneShotMethod):
    """Magnitude N:M: in every M consecutive weights of a row, the ``M - N`` smallest ``|W|`` are zeroed
    (:meth:`OneShotMethod.prune_layer` with :class:`MagnitudeImportance`)."""

    def __init__(self, name: str, pattern: tuple[int, int]) -> None:
        super().__init__(name, pattern)
        self.importance = MagnitudeImportance()


for _n, _m in PATTERNS:
    register_method(f"magnitude_{_n}:{_m}", lambda n=_n, m=_m: MagnitudeNM(f"magnitude_{n}:{m}", (n, m)))
