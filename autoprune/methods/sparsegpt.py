"""SparseGPT: one-shot pruning by layer-wise reconstruction (Frantar & Alistarh, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot", ICML 2023, arXiv:2301.00774).

For each ``nn.Linear`` the calibration inputs ``X`` give the Hessian ``H = 2 X^T X / tokens`` of the
layer-wise reconstruction error ``||W X - W' X||^2``. As in the reference code (github.com/IST-DASLab/sparsegpt):
dampening ``0.01 * mean(diag H)`` on the diagonal, the upper Cholesky factor of ``H^-1``, and columns processed
in blocks of 128: the mask of a block is chosen at its start by the OBS saliency ``w^2 / [H^-1]_jj^2`` (N:M:
every M columns, the ``M - N`` lowest of each row's group), then column by column the pruned weights are zeroed
and the error is spread over the later columns of the block (OBS update), and the block's error over the
remaining columns (lazy batch update). Unstructured: each block prunes its share of ``round(r * numel)``
(``round(r * rows * end) - round(r * rows * start)``), so the layer reaches the requested count exactly.

Differences from the reference: all layers' Hessians come from the dense model's inputs in one calibration pass
(not decoder block by decoder block on the outputs of already-pruned blocks); input features that are always
zero get ``H_jj = 1`` as in the reference but their weights are not forced to zero (the requested count stays
exact); weights already zero stay zero and count toward the ratio.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AutopruneError
from .base import PruneContext
from .importance import Unit
from .llm import PATTERNS, CalibrationImportance, OneShotMethod
from .registry import register_method
from .unstructured import _lowest

BLOCK_SIZE = 128
DAMPENING = 0.01


class SparseGPTImportance(CalibrationImportance):
    """Accumulates ``H = 2 X^T X / tokens`` per layer; scores are the OBS saliencies ``w^2 / [H^-1]_jj^2``
    of the dense weights (what the first block's mask is chosen by)."""

    name = "sparsegpt"

    def accumulate(self, name: str, x: torch.Tensor) -> None:
        self._add(name, x.T @ x, x.shape[0])

    def inverse_hessian(self, name: str, device: torch.device) -> torch.Tensor:
        """The upper Cholesky factor of the dampened ``H^-1`` (what the OBS updates use)."""
        hessian = (2.0 / max(self.tokens[name], 1)) * self.stats[name].to(device)
        dead = torch.diag(hessian) == 0
        hessian[dead, dead] = 1.0
        hessian.diagonal().add_(DAMPENING * torch.mean(torch.diag(hessian)))
        try:
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError as error:
            raise AutopruneError(f"sparsegpt: the calibration Hessian of {name!r} is not positive definite "
                                 f"({error}); use more calibration batches") from error

    def scores(self, unit: Unit, context: PruneContext) -> torch.Tensor:
        weight = unit.params[0][0].detach().float()
        inverse = self.inverse_hessian(unit.name, weight.device)
        return weight.pow(2) / torch.diag(inverse).pow(2)[None, :]


class SparseGPT(OneShotMethod):
    """SparseGPT, unstructured (``pattern=None``) or N:M."""

    def __init__(self, name: str, pattern: tuple[int, int] | None = None) -> None:
        super().__init__(name, pattern)
        self.importance = SparseGPTImportance()

    def prune_layer(self, unit: Unit, layer: nn.Linear, ratio: float, context: PruneContext) -> None:
        weight = layer.weight
        w = weight.detach().float().clone()
        rows, cols = w.shape
        was_zero = w == 0
        hinv = self.importance.inverse_hessian(unit.name, w.device)
        for i1 in range(0, cols, BLOCK_SIZE):
            i2 = min(i1 + BLOCK_SIZE, cols)
            w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
            d = torch.diag(h1)
            q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
            drop = was_zero[:, i1:i2].clone()
            if self.pattern is None:
                saliency = w1.pow(2) / d.pow(2)[None, :]
                saliency[drop] = -float("inf")
                count = round(ratio * rows * i2) - round(ratio * rows * i1)
                drop |= _lowest(saliency.flatten(), count).view_as(w1)
            for i in range(i2 - i1):
                if self.pattern is not None and i % self.pattern[1] == 0:
                    n, m = self.pattern
                    saliency = w1[:, i : i + m].pow(2) / d[i : i + m].pow(2)[None, :]
                    saliency[drop[:, i : i + m]] = -float("inf")
                    drop[:, i : i + m].scatter_(1, torch.topk(saliency, m - n, dim=1, largest=False).indices, True)
                col = w1[:, i]
                q = col.masked_fill(drop[:, i], 0.0)
                q1[:, i] = q
                err = (col - q) / h1[i, i]
                w1[:, i:] -= err[:, None] @ h1[i, i:][None, :]
                err1[:, i] = err
            w[:, i1:i2] = q1
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        weight.copy_(w.to(weight.dtype))


register_method("sparsegpt", lambda: SparseGPT("sparsegpt"))
for _n, _m in PATTERNS:
    register_method(f"sparsegpt_{_n}:{_m}", lambda n=_n, m=_m: SparseGPT(f"sparsegpt_{n}:{m}", (n, m)))
