"""The simple rules a search must beat, as per-unit allocations computed once on the dense model.

A rule turns one whole-model sparsity into a sparsity per unit; the search then evaluates that
allocation as an ordinary trial (same per-unit parameters, same pruning methods, same fine-tuning),
so the rules sit in every study next to the searched trials and are measured the same way:

- ``uniform``: every unit at the same sparsity (:meth:`~autoprune.space.SearchSpace.uniform_params`), once
  with each method of ``study.baseline_methods`` (default: the first configured method), labelled
  ``uniform <method> <s>``. An N:M method has one sparsity (its ``fixed_sparsity``, 0.5): it gets one
  trial there, not one per level. An unstructured method uses the unstructured levels (see :func:`seed_trials`).
- ``global_magnitude``: one magnitude threshold across the weights of every unit an unstructured
  method can prune (global unstructured magnitude pruning, Blalock et al. 2020). ``round(s * N)`` of
  the ``N`` weights of those units are zeroed, the smallest ``|w|`` first, so the reached sparsity of
  those weights is ``s`` up to one weight; a unit's share is its count of zeroed weights over its size.
- ``global_structured``: Torch-Pruning's global channel ranking: each dependency group's channels
  scored by ``MagnitudeImportance(p=1, normalizer='mean')`` (L1 magnitude over the group, divided by
  the group's mean, so groups of different scale compare), then ``round(s * C)`` of the ``C``
  channels of all units removed, the lowest-ranked first. ``s`` is a fraction of output channels
  (as for a unit's own sparsity), not of parameters.
- ``owl``: outlier-weighted layer-wise sparsity, the non-uniform baseline of decoder LLMs (:mod:`autoprune.owl`,
  Yin et al. 2024). Each decoder block's sparsity comes from its share of activation outliers on the
  calibration batches (:func:`~autoprune.owl.owl_allocation` with its defaults M=5, lambda=0.08: fewer
  outliers, more sparsity; the unweighted mean over blocks is ``s``), spread to the block's layers
  (:func:`~autoprune.owl.layer_targets`) and kept for the units the rule's method prunes (other units stay
  at the space's ``low``). Pruned with the first configured of ``wanda``, ``sparsegpt``, ``l1_unstructured``,
  ``l2_unstructured``, at the unstructured levels. OWL needs ``context.calibration_batches``: without
  them, without such a method, or where it cannot keep every block in ``[0, 1)`` at a level, it is
  skipped with a warning.

Both global rules respect ``max_layer_sparsity`` (a unit is never emptied; the pruning methods refuse
more): a unit that would exceed it is held at the cap and the rest of the count goes to the others,
so the whole-model target is still met (OWL holds a unit at the cap too, and then its mean falls short,
said in the log). The allocations are exact fractions of whole weights or channels; values outside a
unit's search range are kept as computed (Optuna warns when they are enqueued). Torch only (and
Torch-Pruning for the structured rule); no Optuna.

The compact ``global`` parametrization holds these rules as curves over the whole-model sparsity
(:func:`allocation_curves`): ``uniform`` with the first configured method, ``uniform_<method>`` with each other
method of ``study.baseline_methods`` (not an N:M method: its one fixed sparsity cannot follow an allocation, so
it is skipped with a warning), the two global rules, and ``owl`` when ``study.baseline_rules`` lists it. Its
seed trials are the rules' points of that space, labelled as above.
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
OWL_PREFERENCE = ("wanda", "sparsegpt", "l1_unstructured", "l2_unstructured")
"""The methods an OWL allocation is pruned with, the first configured one: Wanda (whose metric OWL's outlier
ratios are computed from, as in the paper), then SparseGPT, then magnitude."""
CURVE_RULES = ("uniform", "global_magnitude", "global_structured")
"""The rules every compact ``global`` space tries (:func:`allocation_curves`); ``uniform_<method>`` and ``owl``
are added when the study's baselines ask for them."""


def _fixed_sparsity(method: str) -> float | None:
    """An N:M method's one sparsity (``1 - N/M``), None for a method that reaches any ratio."""
    from .methods import get_method

    return getattr(get_method(method), "fixed_sparsity", None)


def rule_method(rule: str, methods: Sequence[str]) -> str | None:
    """The configured method a global rule's (or OWL's) allocation is pruned with (magnitude methods first;
    for OWL :data:`OWL_PREFERENCE`), or None when no configured method fits the rule (then it is skipped)."""
    from .methods import get_method
    from .methods.structured import StructuredMethod

    if rule == "global_magnitude":  # (an N:M method's one fixed sparsity cannot follow an allocation)
        fits = [m for m in methods if get_method(m).family == "unstructured" and _fixed_sparsity(m) is None]
        preferred = UNSTRUCTURED_PREFERENCE
    elif rule == "global_structured":  # channel groups only (not heads or MLP neurons)
        fits = [m for m in methods if isinstance(get_method(m), StructuredMethod)]
        preferred = STRUCTURED_PREFERENCE
    elif rule == "owl":  # only the named methods: no fallback to another unstructured one
        return next((m for m in OWL_PREFERENCE if m in methods and _fixed_sparsity(m) is None), None)
    else:
        raise ValueError(f"unknown allocation rule {rule!r}; known: global_magnitude, global_structured, owl")
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


def uniform_rule(method: str, first: str) -> str:
    """The compact space's name of the uniform rule with ``method``: ``uniform`` for the first configured
    method ``first`` (the one uniform rule of studies made before ``study.baseline_methods`` reached that
    space, whose stored names must still decode), ``uniform_<method>`` for another."""
    return "uniform" if method == first else f"uniform_{method}"


def allocation_curves(space: SearchSpace, model: nn.Module, context: PruneContext, methods: Sequence[str],
                      grid: Sequence[float], *, baseline_methods: Sequence[str] | None = None,
                      owl: bool = False) -> list[dict[str, object]]:
    """Each rule's per-unit sparsities at every whole-model sparsity of ``grid``, for the compact search
    space (``space.parametrization: global``): ``[{"rule", "method", "grid", "units": {unit: [values]}}]``,
    plain data so that a study stores them once and a resume decodes its trials with the same numbers
    (a study stored before a rule existed keeps its own list).

    The rules, in order: ``uniform`` with ``methods[0]``; ``uniform_<method>`` with each other method of
    ``baseline_methods`` (:func:`uniform_rule`) except an N:M one (its one fixed sparsity cannot follow an
    allocation; :func:`seed_trials` says so); ``global_magnitude``; ``global_structured``; with ``owl``, the
    ``owl`` rule. A rule whose method is not configured, or that the model defeats (said in the log), is left out.

    OWL's allocation is a curve like the others although it reads the dense model's activations: its outlier
    ratios do not depend on the target, so they are computed once (one pass of ``context.calibration_batches``)
    and each block's sparsity is linear in the target, ``target - D_l + mean(D)``
    (:func:`~autoprune.owl.owl_offsets`), which the grid's linear interpolation follows exactly between grid
    points where no block is clipped. Where that
    leaves ``[0, max_layer_sparsity]`` (targets within ``2 * lambda`` of either end) a block is clipped there
    instead of the point being refused (as :func:`~autoprune.owl.owl_allocation` does), and the blocks' mean
    is off the target: short of it where blocks are held at the cap, as the other rules are held there (above
    it where blocks are held at 0)."""
    curves: list[dict[str, object]] = []
    for rule in CURVE_RULES:
        if rule == "uniform":
            curves += _uniform_curves(space, context, methods, baseline_methods, grid)
            continue
        method = rule_method(rule, methods)
        units = _units_of(space, method)
        if not units:
            continue
        try:
            scores = (_magnitude_scores(model, units) if rule == "global_magnitude" else
                      _structured_scores(model, units, context.example_inputs, context.protected))
        except Exception as exc:  # as in seed_trials: said, and the rule left out of the space
            log.warning("rule %s left out of the search space: %s: %s", rule, type(exc).__name__, exc)
            continue
        counts = _allocate_many(scores, grid, context.max_layer_sparsity)
        curves.append(_curve(rule, method, grid, {name: [round(c[name] / scores[name].numel(), 6) for c in counts]
                                                  for name in units}))
    if owl:
        curves += _owl_curve(space, model, context, methods, grid)
    return curves


def _units_of(space: SearchSpace, method: str | None) -> list[str]:
    """The units ``method`` can give a sparsity to (none for no method; a removable block has no sparsity)."""
    return [u.name for u in space.units if not u.removal and method in u.methods] if method else []


def _curve(rule: str, method: str, grid: Sequence[float], values: dict[str, list[float]]) -> dict[str, object]:
    return {"rule": rule, "method": method, "grid": [float(s) for s in grid], "units": values}


def _uniform_curves(space: SearchSpace, context: PruneContext, methods: Sequence[str],
                    baseline_methods: Sequence[str] | None, grid: Sequence[float]) -> list[dict[str, object]]:
    """``uniform`` with ``methods[0]`` (always: the space's uniform rule), then ``uniform_<method>`` with each
    other of ``baseline_methods`` that reaches any sparsity; every unit at the grid point, held at the cap."""
    others = [m for m in baseline_methods or () if m != methods[0] and _fixed_sparsity(m) is None]
    curves = []
    for method in (methods[0], *others):
        units = _units_of(space, method)
        if units:
            values = {name: [min(float(s), context.max_layer_sparsity) for s in grid] for name in units}
            curves.append(_curve(uniform_rule(method, methods[0]), method, grid, values))
    return curves


def _owl_curve(space: SearchSpace, model: nn.Module, context: PruneContext, methods: Sequence[str],
               grid: Sequence[float]) -> list[dict[str, object]]:
    """The ``owl`` rule's curve (see :func:`allocation_curves`), kept for the units the rule's method prunes,
    or none where OWL cannot apply: as for :func:`_owl_trials`, said in the log and left out of the space."""
    from .owl import layer_targets, outlier_ratios, owl_offsets

    method = rule_method("owl", methods)
    if method is None:
        log.warning("rule owl left out of the search space: it prunes with one of %s and none is configured "
                    "(space.methods: %s)", ", ".join(OWL_PREFERENCE), ", ".join(methods))
        return []
    if not context.calibration_batches:
        log.warning("rule owl left out of the search space: its allocation needs calibration batches "
                    "(space.calibration_batches) to find each block's activation outliers, and there are none")
        return []
    try:
        offsets = owl_offsets(outlier_ratios(model, context.calibration_batches, protected=context.protected))
    except Exception as exc:  # a model OWL cannot run: said, and the rule left out of the space
        log.warning("rule owl left out of the search space: %s: %s", type(exc).__name__, exc)
        return []
    by_layer = layer_targets(model, offsets, context.protected)  # each layer: its block's offset
    units = [name for name in _units_of(space, method) if name in by_layer]
    if not units:
        log.warning("rule owl left out of the search space: no unit that %s prunes is a layer of a decoder block",
                    method)
        return []
    cap = context.max_layer_sparsity
    log.info("rule owl: the blocks' mean is the whole-model sparsity from %.3g to %.3g; outside, blocks are held "
             "at 0 or at max_layer_sparsity=%g", max(-o for o in offsets.values()), cap - max(offsets.values()), cap)
    values = {name: [round(min(max(float(s) + by_layer[name], 0.0), cap), 6) for s in grid] for name in units}
    return [_curve("owl", method, grid, values)]


Trials = list[tuple[str, dict[str, object]]]


def seed_trials(space: SearchSpace, model: nn.Module, context: PruneContext, rules: Sequence[str],
                sparsities: Sequence[float], methods: Sequence[str],
                unstructured_sparsities: Sequence[float] | None = None,
                baseline_methods: Sequence[str] | None = None) -> Trials:
    """The baseline trials of a new study, ``(label, params)`` in order: for each rule of ``rules`` that
    applies (a global rule or OWL needs a configured method of its kind), each sparsity of ``sparsities``
    (of ``unstructured_sparsities`` instead, when given, for a rule that zeroes single weights: global
    magnitude, OWL, and uniform with an unstructured method). ``uniform`` runs once per method of
    ``baseline_methods`` (default: ``methods[0]``); an N:M method once, at its fixed sparsity. In the
    ``global`` parametrization each is a point of the compact space (:meth:`~autoprune.space.SearchSpace.rule_params`
    of its rule, :func:`uniform_rule` for uniform), of the rules the space holds: not uniform with an N:M
    method; what is left out is logged.
    Labels: ``uniform <method> 0.5``, ``global magnitude 0.5``, ``global structured 0.5``, ``owl 0.5``."""
    from .methods import get_method

    unknown = [rule for rule in rules if rule not in RULES]
    if unknown:
        raise ValueError(f"unknown baseline rule {unknown[0]!r}; known rules: {', '.join(RULES)}")
    uniform_methods = list(baseline_methods) if baseline_methods is not None else [methods[0]]

    def levels(rule: str, method: str | None = None) -> Sequence[float]:
        unstructured = rule in ("global_magnitude", "owl") or (
            rule == "uniform" and get_method(method or methods[0]).family == "unstructured")
        return unstructured_sparsities if unstructured and unstructured_sparsities is not None else sparsities

    trials: Trials = []
    if space.parametrization == "global":  # a rule's point is one (rule, sparsity) of the compact space
        known = {a.rule for a in space.allocations}
        _warn_not_in_compact_space(rules, uniform_methods, methods[0], known)
        for rule in rules:
            for method in uniform_methods if rule == "uniform" else [methods[0]]:
                name = uniform_rule(method, methods[0]) if rule == "uniform" else rule
                if name in known:
                    trials += [(_label(rule, s, method), space.rule_params(name, s)) for s in levels(rule, method)]
        return trials
    for rule in rules:
        if rule == "uniform":
            for method in uniform_methods:
                trials += _uniform_trials(space, method, levels(rule, method))
            continue
        if rule == "owl":
            trials += _owl_trials(space, model, context, methods, levels(rule))
            continue
        method = rule_method(rule, methods)
        units = _units_of(space, method)
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
            trials.append((_label(rule, s, method), space.allocation_params(allocation, method)))
    return trials


def _uniform_trials(space: SearchSpace, method: str, levels: Sequence[float]) -> Trials:
    """The ``uniform`` rule with ``method`` at each of ``levels``; an N:M method has one sparsity, so it gets
    one trial there (one per level would be the same plan under several labels), none when ``levels`` is empty."""
    fixed = _fixed_sparsity(method)
    at = levels if fixed is None else ([fixed] if levels else [])
    return [(_label("uniform", s, method), space.uniform_params(s, method)) for s in at]


def _owl_trials(space: SearchSpace, model: nn.Module, context: PruneContext, methods: Sequence[str],
                levels: Sequence[float]) -> Trials:
    """The ``owl`` rule at each of ``levels``: OWL's block allocation on the dense model and the calibration
    batches, spread to the layers and kept for the units the rule's method prunes. Where OWL cannot apply
    (no method of :data:`OWL_PREFERENCE`, no calibration batches, a level lambda cannot place in ``[0, 1)``)
    it is said in the log and skipped, like a global rule the model defeats: the search goes on."""
    from .owl import allocation_at, layer_targets, outlier_ratios, owl_offsets

    method = rule_method("owl", methods)
    if method is None:
        log.warning("baseline rule owl skipped: it prunes with one of %s and none is configured (space.methods: %s)",
                    ", ".join(OWL_PREFERENCE), ", ".join(methods))
        return []
    if not context.calibration_batches:
        log.warning("baseline rule owl skipped: its allocation needs calibration batches (space.calibration_batches) "
                    "to find each block's activation outliers, and there are none")
        return []
    try:  # the outlier ratios do not depend on the level: one calibration pass serves them all
        offsets = owl_offsets(outlier_ratios(model, context.calibration_batches, protected=context.protected))
    except Exception as exc:  # a model OWL cannot run: said, and the rule skipped
        log.warning("baseline rule owl skipped: %s: %s", type(exc).__name__, exc)
        return []
    units = _units_of(space, method)
    cap = context.max_layer_sparsity
    trials: Trials = []
    for s in levels:
        try:
            blocks = allocation_at(offsets, s)
        except ValueError as exc:  # lambda pushes a block outside [0, 1) at this level
            log.warning("baseline rule owl at %g skipped: %s: %s", s, type(exc).__name__, exc)
            continue
        targets = layer_targets(model, blocks, context.protected)
        allocation = {name: min(targets[name], cap) for name in units if name in targets}
        if not allocation:
            log.warning("baseline rule owl skipped: no unit that %s prunes is a layer of a decoder block", method)
            return []
        if any(targets[name] > cap for name in allocation):
            log.warning("baseline rule owl at %g: layers held at max_layer_sparsity=%g, so its mean is below %g",
                        s, cap, s)
        trials.append((_label("owl", s, method), space.allocation_params(allocation, method)))
    return trials


def _warn_not_in_compact_space(rules: Sequence[str], uniform_methods: Sequence[str], first: str,
                               known: set[str]) -> None:
    """Say which asked-for baselines the compact space (its rules: ``known``) has no point for: uniform with
    an N:M method (its one fixed sparsity cannot follow an allocation, so :func:`allocation_curves` makes it no
    curve), and any other rule the space lacks (left out where it cannot apply, said when the space was made,
    or a study made before the rule could be one of that space)."""
    if "uniform" in rules:
        fixed = [m for m in uniform_methods if m != first and _fixed_sparsity(m) is not None]
        if fixed:
            log.warning("study.baseline_methods %s skipped: space.parametrization 'global' moves each unit's "
                        "sparsity along an allocation, and an N:M method has one fixed sparsity; use 'per_unit' "
                        "for their uniform baselines", fixed)
        missing = [m for m in uniform_methods if m not in fixed and uniform_rule(m, first) not in known]
        if missing:
            log.warning("study.baseline_methods %s skipped: the compact search space has no uniform rule with them "
                        "(its rules: %s)", missing, ", ".join(sorted(known)))
    if "owl" in rules and "owl" not in known:
        log.warning("baseline rule owl skipped: the compact search space has no owl rule (its rules: %s)",
                    ", ".join(sorted(known)))


def _label(rule: str, sparsity: float, method: str) -> str:
    return f"uniform {method} {sparsity:g}" if rule == "uniform" else f"{rule.replace('_', ' ')} {sparsity:g}"
