"""OWL: outlier-weighted layer-wise sparsity, the non-uniform LLM baseline (Yin, Wu, Zhang, Yin, Wang, Pechenizkiy,
Chen, Wang, Pei, Liu, Mocanu, Wang, Liu, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
Pruning LLMs to High Sparsity", ICML 2024, arXiv:2310.05175; reference code github.com/luuyin/OWL).

Torch only. For every decoder block the Wanda metric ``|W_ij| * ||X_j||`` of all its pruned ``nn.Linear`` layers
(calibration inputs of the dense model, :mod:`autoprune.methods.wanda`) is pooled, and the block's *outlier
ratio* ``D_l`` is the fraction of entries above ``M`` times their mean. As in the reference code the ratios are
scaled to ``[0, 2 * lambda]`` (``D = (D - min) / (max - min) * 2 * lambda``) and block ``l`` gets sparsity
``target - D_l + mean(D)``: more outliers, less sparsity; the unweighted mean over blocks is exactly ``target``
and the spread is at most ``2 * lambda``. Equal ratios give the uniform allocation.

Blocks are the elements of the model's longest ``nn.ModuleList`` that hold candidate layers (``model.layers`` of
a Hugging Face decoder); a model without one treats each candidate ``nn.Linear`` as its own block.
:func:`layer_targets` spreads a block allocation over the block's layers (the per-unit targets of a plan).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .methods.base import PruneContext
from .methods.importance import Unit
from .methods.llm import linear_layers
from .methods.wanda import WandaImportance


def decoder_blocks(model: nn.Module, layers: Sequence[str]) -> dict[str, list[str]]:
    """Block name -> the names in ``layers`` inside it, in module order (see the module docstring)."""
    best: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            prefix = f"{name}." if name else ""
            children = [f"{prefix}{child}" for child, _ in module.named_children()]
            holding = [c for c in children if any(layer.startswith(c + ".") for layer in layers)]
            if len(holding) > len(best):
                best = holding
    if len(best) < 2:
        return {layer: [layer] for layer in layers}
    blocks = {block: [layer for layer in layers if layer.startswith(block + ".")] for block in best}
    return {block: members for block, members in blocks.items() if members}


def outlier_ratios(
    model: nn.Module,
    calibration_batches: Sequence[object],
    m: float = 5.0,
    protected: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """Block name -> fraction of its Wanda scores above ``m`` times their mean (dense model, calibration inputs)."""
    layers = linear_layers(model, protected)
    units = [Unit.weights(name, layer) for name, layer in layers.items()]
    importance = WandaImportance()
    context = PruneContext(example_inputs=torch.zeros(1), calibration_batches=calibration_batches, protected=protected)
    importance.prepare(model, units, context)
    scores = {unit.name: importance.scores(unit, context).flatten() for unit in units}
    importance.release()
    ratios = {}
    for block, members in decoder_blocks(model, list(layers)).items():
        pooled = torch.cat([scores[name] for name in members])
        ratios[block] = float((pooled > m * pooled.mean()).float().mean())
    return ratios


def owl_offsets(ratios: Mapping[str, float], lam: float = 0.08) -> dict[str, float]:
    """Block name -> its OWL sparsity minus the target, ``mean(D) - D_l``, from the outlier ratios of
    :func:`outlier_ratios` scaled to ``[0, 2 * lam]`` (see the module docstring); 0 for all when they are equal.

    The offsets do not depend on the target: OWL's allocation is ``target + offset``, linear in the target,
    so the ratios (a pass of the calibration batches through the dense model) serve every target."""
    if lam < 0:
        raise ValueError(f"OWL: lambda {lam} is negative")
    if not ratios:
        raise ValueError("OWL: no decoder block to allocate to (no prunable nn.Linear layer)")
    low, high = min(ratios.values()), max(ratios.values())
    scaled = {block: (v - low) / (high - low) * 2 * lam if high > low else 0.0 for block, v in ratios.items()}
    mean = sum(scaled.values()) / len(scaled)
    return {block: mean - d for block, d in scaled.items()}


def owl_allocation(
    model: nn.Module,
    calibration_batches: Sequence[object],
    target: float,
    m: float = 5.0,
    lam: float = 0.08,
    protected: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """Block name -> sparsity: OWL's allocation for mean sparsity ``target`` with outlier threshold ``m`` and
    spread ``lam`` (lambda). ``calibration_batches``: ``(inputs, labels)`` pairs or bare inputs.

    Raises ValueError when ``target`` is outside ``[0, 1)`` or a block would leave ``[0, 1)`` (lower ``lam``).
    """
    _check_target(target)
    return allocation_at(owl_offsets(outlier_ratios(model, calibration_batches, m, protected), lam), target, lam)


def allocation_at(offsets: Mapping[str, float], target: float, lam: float = 0.08) -> dict[str, float]:
    """Block name -> sparsity: the allocation of :func:`owl_offsets` (made with ``lam``) at mean sparsity
    ``target``, so that one calibration pass serves many targets. Raises ValueError as :func:`owl_allocation`."""
    _check_target(target)
    allocation = {block: target + offset for block, offset in offsets.items()}
    bad = {block: s for block, s in allocation.items() if not 0.0 <= s < 1.0}
    if bad:
        raise ValueError(f"OWL: lambda {lam} moves blocks outside [0, 1) at target {target}: {bad}; lower lambda")
    return allocation


def _check_target(target: float) -> None:
    if not 0.0 <= target < 1.0:
        raise ValueError(f"OWL: target sparsity {target} is outside [0, 1)")


def layer_targets(
    model: nn.Module, allocation: Mapping[str, float], protected: frozenset[str] = frozenset()
) -> dict[str, float]:
    """Per-layer targets (``nn.Linear`` name -> sparsity) from a block allocation of :func:`owl_allocation`
    (each layer gets its block's value, so the per-block offsets of :func:`owl_offsets` spread the same way)."""
    layers = list(linear_layers(model, protected))
    return {layer: allocation[block] for block, members in decoder_blocks(model, layers).items()
            if block in allocation for layer in members}
