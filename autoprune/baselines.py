"""The simple rules a search must beat, as per-unit allocations computed once on the dense model.

A rule turns one whole-model sparsity into a sparsity per unit; the search then evaluates that
allocation as an ordinary trial (same per-unit parameters, same pruning methods, same fine-tuning),
so the rules sit in every study next to the searched trials and are measured the same way:

- ``uniform``: every unit at the same sparsity (:meth:`~autoprune.space.SearchSpace.uniform_params`).
- ``global_magnitude``: one magnitude threshold across the weights of every unit an unstructured
  method can prune (global unstructured magnitude pruning, Blalock et al. 2020). ``round(s * N)`` of
  the ``N`` weights of those units are zeroed, the smallest ``|w|`` first, so the reached sparsity of
  those weights is ``s`` up to one weight; a unit's share is its count of zeroed weights over its size.
- ``global_structured``: Torch-Pruning's global channel ranking: each dependency group's channels
  scored by ``MagnitudeImportance(p=1, normalizer='mean')`` (L1 magnitude over the group, divided by
  the group's mean, so groups of different scale compare), then ``round(s * C)`` of the ``C``
  channels of all units removed, the lowest-ranked first. ``s`` is a fraction of output channels
  (as for a unit's own sparsity), not of parameters.

Both global rules respect ``max_layer_sparsity`` (a unit is never emptied; the pruning methods refuse
more): a unit that would exceed it is held at the cap and the rest of the count goes to the others,
so the whole-model target is still met. The allocations are exact fractions of whole weights or
channels; values outside a unit's search range are kept as computed (Optuna warns when they are
enqueued). Torch only (and Torch-Pruning for the structured rule); no Optuna.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import BASELINE_RULES as RULES  # the names ``study.baseline_rules`` may use

if TYPE_CHECKING:
    from .methods import PruneContext
    from .space import SearchSpace


log = logging.getLogger("autoprune")

UNSTRUCTURED_PREFERENCE = ("l1_unstructured", "l2_unstructured")
STRUCTURED_PREFERENCE = ("l1_structured", "l2_structured")


def rule_method(rule: str, methods: Sequence[str]) -> str | None:
    """The configured method a global rule's allocation is pruned with (magnitude methods first), or None
    when no configured method fits the rule (then the rule is skipped)."""
    from .methods import get_method
    from .methods.structured import StructuredMethod

    if rule == "global_magnitude":  # (an N:M method's one fixed sparsity cannot follow an allocation)
        fits = [m for m in methods if get_method(m).family == "unstructured"
                and getattr(get_method(m), "fixed_sparsity", None) is None]
        preferred = UNSTRUCTURED_PREFERENCE
    elif rule == "global_structured":  # channel groups only (not heads or MLP neurons)
        fits = [m for m in methods if isinstance(get_method(m), StructuredMethod)]
        preferred = STRUCTURED_PREFERENCE
    else:
        raise ValueError(f"unknown global rule {rule!r}; known: global_magnitude, global_structured")
    return next((m for m in preferred if m in fits), fits[0] if fits else None)


def _allocate_many(scores: Mapping[str, torch.Tensor], sparsities: Sequence[float], cap: float) -> list[dict[str, int]]:
    """How many of each unit's parts to remove, for each of ``sparsities``, so that ``round(s * total)`` of
    all parts go, the lowest scores first across units, no unit losing more than ``floor(cap * size)``
    parts (and at least one part kept).

    A unit at its cap keeps its remaining parts and the next-lowest parts of other units go instead: in
    the global ranking (sorted once), a unit's parts past its limit are skipped, and the first ``k`` parts
    left are removed. Ranking once and counting along it keeps this cheap for many sparsities and large
    models (one sort of all weights, not one per sparsity)."""
    names = list(scores)
    sizes = torch.tensor([int(scores[name].numel()) for name in names], dtype=torch.long)
    limit = torch.tensor([max(0, min(math.floor(cap * int(n) + 1e-9), int(n) - 1)) for n in sizes], dtype=torch.long)
    flat = torch.cat([scores[name].detach().flatten().to(torch.float64) for name in names])
    owner = torch.repeat_interleave(torch.arange(len(names)), sizes)
    ranked_owner = owner[torch.argsort(flat, stable=True)]
    by_unit = torch.argsort(ranked_owner, stable=True)  # positions in the ranking, grouped by unit in rank order
    starts = torch.cumsum(sizes, 0) - sizes
    rank_in_unit = torch.empty_like(ranked_owner)
    rank_in_unit[by_unit] = torch.arange(len(flat)) - starts[ranked_owner[by_unit]]
    eligible = ranked_owner[rank_in_unit < limit[ranked_owner]]
    available = int(limit.sum())
    result = []
    for sparsity in sparsities:
        wanted = round(sparsity * int(sizes.sum()))
        if wanted > available:
            log.warning("a global rule at %g cannot be reached with max_layer_sparsity=%g: %d of %d parts instead",
                        sparsity, cap, available, wanted)
            wanted = available
        counts = torch.bincount(eligible[:wanted], minlength=len(names))
        result.append({name: int(counts[i]) for i, name in enumerate(names)})
    return result


def _allocate(scores: Mapping[str, torch.Tensor], sparsity: float, cap: float) -> dict[str, int]:
    """:func:`_allocate_many` for one sparsity."""
    return _allocate_many(scores, [sparsity], cap)[0]


def global_magnitude(model: nn.Module, units: Sequence[str], sparsity: float,
                     max_layer_sparsity: float = 1.0) -> dict[str, float]:
    """Unit (layer) -> fraction of its weights below one global ``|w|`` threshold, so that
    ``sparsity`` of all the units' weights are zeroed (already-zero weights count, lowest first)."""
    scores = _magnitude_scores(model, units)
    counts = _allocate(scores, sparsity, max_layer_sparsity)
    return {name: counts[name] / scores[name].numel() for name in units}


def _magnitude_scores(model: nn.Module, units: Sequence[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach().abs() for name in units}


def global_structured(model: nn.Module, units: Sequence[str], sparsity: float, example_inputs: torch.Tensor,
                      protected: frozenset[str] = frozenset(), max_layer_sparsity: float = 1.0) -> dict[str, float]:
    """Unit (dependency-group root) -> fraction of its output channels removed by Torch-Pruning's global
    ranking with mean-normalized L1 group importance, so that ``sparsity`` of all the units' channels go.
    With ``space.round_to`` the pruning method rounds each unit's kept channels, so the total may move a little."""
    scores = _structured_scores(model, units, example_inputs, protected)
    counts = _allocate(scores, sparsity, max_layer_sparsity)
    return {name: counts[name] / scores[name].numel() for name in units}


def _structured_scores(model: nn.Module, units: Sequence[str], example_inputs: torch.Tensor,
                       protected: frozenset[str]) -> dict[str, torch.Tensor]:
    import torch_pruning as tp

    from .methods._common import preserved_modes
    from .methods.structured import _expand, _forward, scan_groups

    importance = tp.importance.MagnitudeImportance(p=1, normalizer="mean")
    modules = dict(model.named_modules())
    with preserved_modes(model):
        model.eval()
        dg = tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=_forward)  # traces: grads on
        ignored = _expand([modules[name] for name in sorted(protected) if name in modules])
        groups = scan_groups(dg, model, ignored)
        missing = [name for name in units if name not in groups]
        if missing:
            raise ValueError(f"global_structured: no channel group rooted at {missing}")
        with torch.no_grad():
            return {name: importance(groups[name].group).detach().flatten() for name in units}


def allocation_curves(space: SearchSpace, model: nn.Module, context: PruneContext, methods: Sequence[str],
                      grid: Sequence[float]) -> list[dict[str, object]]:
    """Each rule's per-unit sparsities at every whole-model sparsity of ``grid``, for the compact search
    space (``space.parametrization: global``): ``[{"rule", "method", "grid", "units": {unit: [values]}}]``,
    plain data so that a study stores them once and a resume decodes its trials with the same numbers.
    A rule whose method is not configured, or that the model defeats (said in the log), is left out."""
    curves: list[dict[str, object]] = []
    for rule in RULES:
        method = methods[0] if rule == "uniform" else rule_method(rule, methods)
        units = [u.name for u in space.units if not u.removal and method in u.methods] if method else []
        if not units:
            continue
        if rule == "uniform":
            values = {name: [min(float(s), context.max_layer_sparsity) for s in grid] for name in units}
        else:
            try:
                scores = (_magnitude_scores(model, units) if rule == "global_magnitude" else
                          _structured_scores(model, units, context.example_inputs, context.protected))
            except Exception as exc:  # as in seed_trials: said, and the rule left out of the space
                log.warning("rule %s left out of the search space: %s: %s", rule, type(exc).__name__, exc)
                continue
            counts = _allocate_many(scores, grid, context.max_layer_sparsity)
            values = {name: [round(c[name] / scores[name].numel(), 6) for c in counts] for name in units}
        curves.append({"rule": rule, "method": method, "grid": [float(s) for s in grid], "units": values})
    return curves


def seed_trials(space: SearchSpace, model: nn.Module, context: PruneContext, rules: Sequence[str],
                sparsities: Sequence[float], methods: Sequence[str],
                unstructured_sparsities: Sequence[float] | None = None) -> list[tuple[str, dict[str, object]]]:
    """The baseline trials of a new study, ``(label, params)`` in order: for each rule of ``rules`` that
    applies (a global rule needs a configured method of its kind), each sparsity of ``sparsities`` (of
    ``unstructured_sparsities`` instead, when given, for a rule that zeroes single weights: global
    magnitude, and uniform with an unstructured first method).
    Labels: ``uniform <method> 0.5``, ``global magnitude 0.5``, ``global structured 0.5``."""
    from .methods import get_method

    unknown = [rule for rule in rules if rule not in RULES]
    if unknown:
        raise ValueError(f"unknown baseline rule {unknown[0]!r}; known rules: {', '.join(RULES)}")

    def levels(rule: str) -> Sequence[float]:
        unstructured = rule == "global_magnitude" or (
            rule == "uniform" and get_method(methods[0]).family == "unstructured")
        return unstructured_sparsities if unstructured and unstructured_sparsities is not None else sparsities

    if space.parametrization == "global":  # a rule's point is one (rule, sparsity) of the compact space
        known = {a.rule for a in space.allocations}
        return [(_label(rule, s, methods), space.rule_params(rule, s)) for rule in rules if rule in known
                for s in levels(rule)]
    trials: list[tuple[str, dict[str, object]]] = []
    for rule in rules:
        if rule == "uniform":
            trials += [(_label(rule, s, methods), space.uniform_params(s, methods[0])) for s in levels(rule)]
            continue
        method = rule_method(rule, methods)
        units = [u.name for u in space.units if not u.removal and method in u.methods] if method else []
        if not units:
            continue
        try:
            scores = (_magnitude_scores(model, units) if rule == "global_magnitude" else
                      _structured_scores(model, units, context.example_inputs, context.protected))
        except Exception as exc:  # a rule the model defeats must not stop the search: said, and skipped
            log.warning("baseline rule %s skipped: %s: %s", rule, type(exc).__name__, exc)
            continue
        for s, counts in zip(levels(rule), _allocate_many(scores, levels(rule), context.max_layer_sparsity),
                             strict=True):
            allocation = {name: counts[name] / scores[name].numel() for name in units}
            trials.append((_label(rule, s, methods), space.allocation_params(allocation, method)))
    return trials


def _label(rule: str, sparsity: float, methods: Sequence[str]) -> str:
    return f"uniform {methods[0]} {sparsity:g}" if rule == "uniform" else f"{rule.replace('_', ' ')} {sparsity:g}"
