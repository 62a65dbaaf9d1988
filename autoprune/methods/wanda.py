"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning
Approach for Large Language Models", ICLR 2024, arXiv:2306.11695).

A weight ``W[i, j]`` of an ``nn.Linear`` scores ``|W[i, j]| * ||X_j||``, where ``||X_j||`` is the L2 norm
of input feature ``j`` over the calibration tokens (here the root mean square, which ranks the same), and
weights are compared **within each output row** (the paper's per-output comparison group), no weight
update. ``wanda`` zeros ``round(r * numel)`` weights of a layer: ``count // rows`` lowest in every row and
the remainder where the next-lowest scores are lowest, so the layer reaches the requested count exactly.
``wanda_2:4`` / ``wanda_4:8`` zero the ``M - N`` lowest of every M consecutive weights of a row
(sparsity fixed at 0.5; see :mod:`.llm`). Weights already zero score lowest, so they count toward the ratio.

Difference from the reference code (github.com/locuslab/wanda): the norms are taken from the dense model's
activations for all layers in one calibration pass, not decoder block by decoder block on the outputs of the
already-pruned blocks.
"""

from __future__ import annotations

import torch

from .base import PruneContext
from .importance import Unit
from .llm import PATTERNS, CalibrationImportance, OneShotMethod
from .registry import register_method


class WandaImportance(CalibrationImportance):
    """``|W| * ||X_j||`` per weight from the calibration inputs (``||X_j||`` as a root mean square)."""

    name = "wanda"

    def accumulate(self, name: str, x: torch.Tensor) -> None:
        self._add(name, x.pow(2).sum(dim=0), x.shape[0])

    def input_norms(self, name: str) -> torch.Tensor:
        """``[in_features]``: the root mean square of each input feature of layer ``name``."""
        return (self.stats[name] / max(self.tokens[name], 1)).sqrt()

    def scores(self, unit: Unit, context: PruneContext) -> torch.Tensor:
        weight = unit.params[0][0].detach()
        norms = self.input_norms(unit.name).to(weight.device)
        return weight.float().abs() * norms[None, :]


class Wanda(OneShotMethod):
    """Wanda, unstructured (``pattern=None``) or N:M: :meth:`OneShotMethod.prune_layer` zeroes the lowest
    ``|W|·||X||`` of each output row (or of each N:M group)."""

    def __init__(self, name: str, pattern: tuple[int, int] | None = None) -> None:
        super().__init__(name, pattern)
        self.importance = WandaImportance()


register_method("wanda", lambda: Wanda("wanda"))
for _n, _m in PATTERNS:
    register_method(f"wanda_{_n}:{_m}", lambda n=_n, m=_m: Wanda(f"wanda_{n}:{m}", (n, m)))
