"""From a model to a search space, and from sampled parameters back to a :class:`Plan`.

Each configured method lists the units it can prune (layers, dependency-group
roots, blocks). A unit gets one sparsity parameter and, where several methods
can prune it, a categorical method choice; a removable block gets a yes/no.
Trial-wide choices, each a categorical only when the config leaves it to the search:
``quantize`` (int8 Linear layers, ``space.quantize: search``), ``schedule`` (one-shot or
iterative, when ``space.schedules`` lists both) and ``rewind`` (``space.rewind: search``).

That is the ``per_unit`` parametrization. The compact ``global`` one (``space.parametrization``) has a
whole-model sparsity and a rule (``global/sparsity``, ``global/rule``: uniform with each baseline method,
global magnitude, global structured, OWL; see :func:`autoprune.baselines.allocation_curves`) that turn into
per-unit sparsities through the rule's allocation on the dense model (:class:`Allocation`), plus a shift per
unit around that allocation (``<unit>/shift``, in log-odds, within +-``space.allocation_spread``). Every
sampled point is then a perturbed simple rule: a sampler starts from allocations that are already good,
instead of from random per-unit sparsities, and the rules themselves are points of the space (all shifts 0).

Only Optuna's distribution classes are used here: no study, no sampler.
"""

from __future__ import annotations

import bisect
import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from torch import nn

from . import quantize as quantization
from .errors import AutopruneError, ConfigError
from .methods import PruneContext, get_method
from .plan import LayerPlan, Plan

QUANTIZE_PARAM = "quantize"
SCHEDULE_PARAM = "schedule"
REWIND_PARAM = "rewind"
GLOBAL_RULE_PARAM = "global/rule"
GLOBAL_SPARSITY_PARAM = "global/sparsity"
PARAMETRIZATIONS = ("per_unit", "global")


@dataclass(frozen=True)
class Unit:
    """A prunable unit and the methods that may prune it (in config order)."""

    name: str
    methods: tuple[str, ...]
    removal: bool = False


@dataclass(frozen=True)
class Allocation:
    """One simple rule's per-unit sparsities as functions of the whole-model sparsity: each unit's value
    at every point of ``grid`` (computed once on the dense model by :func:`autoprune.baselines.allocation_curves`
    and stored in the study, so a resumed search decodes its trials with the same numbers)."""

    rule: str
    method: str
    grid: tuple[float, ...]
    units: tuple[tuple[str, tuple[float, ...]], ...]

    @classmethod
    def from_data(cls, data: Mapping[str, object]) -> Allocation:
        units = data["units"]
        assert isinstance(units, Mapping)
        return cls(str(data["rule"]), str(data["method"]), tuple(float(g) for g in data["grid"]),  # type: ignore[attr-defined]
                   tuple((str(name), tuple(float(v) for v in values)) for name, values in units.items()))

    def at(self, sparsity: float) -> dict[str, float]:
        """Each unit's sparsity under this rule at whole-model ``sparsity``: linear between grid points,
        the end values outside the grid."""
        grid = self.grid
        i = min(max(bisect.bisect_right(grid, sparsity) - 1, 0), max(len(grid) - 2, 0))
        if len(grid) == 1 or sparsity <= grid[0]:
            return {name: values[0] for name, values in self.units}
        if sparsity >= grid[-1]:
            return {name: values[-1] for name, values in self.units}
        t = (sparsity - grid[i]) / (grid[i + 1] - grid[i])
        return {name: values[i] + t * (values[i + 1] - values[i]) for name, values in self.units}


def shifted(reference: float, shift: float) -> float:
    """``reference`` moved by ``shift`` in log-odds: 0 and 1 stay where they are, and the result stays in (0, 1)."""
    if shift == 0 or reference <= 0.0 or reference >= 1.0:
        return reference
    return 1.0 / (1.0 + math.exp(-(math.log(reference / (1.0 - reference)) + shift)))


def find_head(model: nn.Module) -> str:
    """The classifier head: the last Linear or Conv layer in registration order."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            name = module_name
    if name is None:
        raise ConfigError("field 'space.head': no Linear or Conv layer found in the model; set it explicitly")
    return name


def _check_quantizable(model: nn.Module) -> None:
    try:
        quantization.check_available()
    except AutopruneError as exc:
        raise ConfigError(f"field 'space.quantize': {exc}") from None
    if not any(type(m) is nn.Linear for m in model.modules()):
        raise ConfigError("field 'space.quantize': the model has no nn.Linear layer, and int8 dynamic quantization "
                          "covers Linear layers only; set it to 'never'")


def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@dataclass(frozen=True)
class SearchSpace:
    units: tuple[Unit, ...]
    low: float
    high: float
    step: float | None = None
    quantize: str = "never"
    schedules: tuple[str, ...] = ("oneshot",)
    iterative_rounds: int = 3
    rewind: str = "never"
    unit_high: tuple[tuple[str, float], ...] = ()
    """Per-unit upper sparsity below ``high`` (from a sensitivity analysis); other units use ``high``."""
    parametrization: str = "per_unit"
    spread: float = 1.0
    """``global`` parametrization: each unit's shift from its rule's allocation, in log-odds, within +-spread."""
    allocations: tuple[Allocation, ...] = ()
    """``global`` parametrization: the rules' allocations (see :meth:`with_allocations`)."""
    max_layer_sparsity: float = 1.0

    def __post_init__(self) -> None:
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"unknown parametrization {self.parametrization!r}; known: {', '.join(PARAMETRIZATIONS)}")
        if self.spread < 0:
            raise ValueError(f"expected spread >= 0, got {self.spread!r}")

    def with_allocations(self, allocations: Sequence[Mapping[str, object]]) -> SearchSpace:
        """This space with the rules' allocations of :func:`autoprune.baselines.allocation_curves` (plain
        data, as stored in the study); the ``global`` parametrization decodes through them."""
        return replace(self, allocations=tuple(Allocation.from_data(a) for a in allocations))

    def with_unit_highs(self, highs: Mapping[str, float]) -> SearchSpace:
        """This space with each named unit's sparsity range capped at its value (never below ``low``)."""
        return replace(self, unit_high=tuple(sorted((name, float(value)) for name, value in highs.items())))

    def high_of(self, unit: str) -> float:
        """The upper sparsity of ``unit``: ``high``, or its cap snapped down to ``step`` and kept >= ``low``."""
        cap = dict(self.unit_high).get(unit)
        if cap is None or cap >= self.high:
            return self.high
        if self.step:
            cap = self.low + math.floor((cap - self.low) / self.step + 1e-9) * self.step
        return max(self.low, round(cap, 10))

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        context: PruneContext,
        methods: Sequence[str],
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        *,
        low: float = 0.0,
        high: float = 0.9,
        step: float | None = None,
        quantize: str = "never",
        schedules: Sequence[str] = ("oneshot",),
        iterative_rounds: int = 3,
        rewind: str = "never",
        parametrization: str = "per_unit",
        spread: float = 1.0,
    ) -> SearchSpace:
        """Ask each method for its candidates and keep those ``include`` / ``exclude`` select.

        A pattern that selects nothing is an error: it is almost always a typo.
        """
        by_name: dict[str, list[str]] = {}
        removal: set[str] = set()
        for method_name in methods:
            method = get_method(method_name)
            for unit in method.candidates(model, context):
                by_name.setdefault(unit, []).append(method_name)
                if method.family == "removal":
                    removal.add(unit)
        for field, patterns in (("space.include", include), ("space.exclude", exclude)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in by_name):
                    known = ", ".join(sorted(by_name)) or "(none)"
                    raise ConfigError(f"field {field!r}: pattern {pattern!r} matches no prunable unit; "
                                      f"prunable units: {known}")
        if quantize != "never":
            _check_quantizable(model)
        units = tuple(
            Unit(name, tuple(names), removal=name in removal)
            for name, names in by_name.items()
            if _match(name, include) and not _match(name, exclude)
        )
        if not units:
            raise ConfigError("field 'space': no prunable unit left after include/exclude")
        return cls(units, low, high, step, quantize, tuple(schedules), iterative_rounds, rewind,
                   parametrization=parametrization, spread=spread, max_layer_sparsity=context.max_layer_sparsity)

    def distributions(self) -> dict[str, BaseDistribution]:
        dists: dict[str, BaseDistribution] = {}
        shifted_units = self._shifted_units()
        if self.parametrization == "global":
            dists[GLOBAL_RULE_PARAM] = CategoricalDistribution(tuple(a.rule for a in self._allocations()))
            dists[GLOBAL_SPARSITY_PARAM] = FloatDistribution(self.low, self.high, step=self.step)
        for unit in self.units:
            if unit.removal:
                dists[f"{unit.name}/remove"] = CategoricalDistribution((False, True))
            elif self.parametrization == "global":
                if unit.name in shifted_units:
                    dists[f"{unit.name}/shift"] = FloatDistribution(-self.spread, self.spread)
            else:
                if len(unit.methods) > 1:
                    dists[f"{unit.name}/method"] = CategoricalDistribution(unit.methods)
                dists[f"{unit.name}/sparsity"] = FloatDistribution(self.low, self.high_of(unit.name), step=self.step)
        if self.quantize == "search":
            dists[QUANTIZE_PARAM] = CategoricalDistribution((False, True))
        if len(self.schedules) > 1:
            dists[SCHEDULE_PARAM] = CategoricalDistribution(self.schedules)
        if self.rewind == "search":
            dists[REWIND_PARAM] = CategoricalDistribution((False, True))
        return dists

    def decode(self, params: Mapping[str, object]) -> Plan:
        """Sampled parameters -> the plan a trial executes (units at sparsity 0 are dropped)."""
        layers = self._global_layers(params) if self.parametrization == "global" else self._unit_layers(params)
        layers += [LayerPlan(u.name, u.methods[0], 1.0) for u in self.units if u.removal and params[f"{u.name}/remove"]]
        order = {unit.name: i for i, unit in enumerate(self.units)}
        layers.sort(key=lambda layer: order[layer.layer])  # in unit order, as the model lists them
        quantize = self.quantize == "always" or bool(params.get(QUANTIZE_PARAM, False))
        schedule = str(params.get(SCHEDULE_PARAM, self.schedules[0]))
        rounds = self.iterative_rounds if schedule == "iterative" else 1
        rewind = self.rewind == "always" or bool(params.get(REWIND_PARAM, False))
        return Plan(tuple(layers), quantize=quantize, schedule=schedule, rounds=rounds, rewind=rewind)

    def _unit_layers(self, params: Mapping[str, object]) -> list[LayerPlan]:
        layers = []
        for unit in self.units:
            if unit.removal:
                continue
            method = str(params.get(f"{unit.name}/method", unit.methods[0]))
            sparsity = float(params[f"{unit.name}/sparsity"])  # type: ignore[arg-type]
            if sparsity > 0:  # an N:M method has one sparsity: any sampled value > 0 means "prune N:M"
                fixed = getattr(get_method(method), "fixed_sparsity", None)
                layers.append(LayerPlan(unit.name, method, sparsity if fixed is None else fixed))
        return layers

    def _global_layers(self, params: Mapping[str, object]) -> list[LayerPlan]:
        """The rule's allocation at the sampled whole-model sparsity, each unit moved by its shift and held
        at its cap (``max_layer_sparsity``, or its sensitivity bound)."""
        rule = str(params[GLOBAL_RULE_PARAM])
        allocation = next((a for a in self._allocations() if a.rule == rule), None)
        if allocation is None:
            raise ValueError(f"rule {rule!r} is not in this space; its rules: {[a.rule for a in self.allocations]}")
        reference = allocation.at(float(params[GLOBAL_SPARSITY_PARAM]))  # type: ignore[arg-type]
        caps = dict(self.unit_high)
        layers = []
        for unit in self.units:
            if unit.removal or unit.name not in reference:
                continue
            shift = float(params[f"{unit.name}/shift"]) if self.spread > 0 else 0.0  # type: ignore[arg-type]
            sparsity = min(shifted(reference[unit.name], shift), caps.get(unit.name, 1.0), self.max_layer_sparsity)
            if sparsity > 0:
                layers.append(LayerPlan(unit.name, allocation.method, round(sparsity, 6)))
        return layers

    def _allocations(self) -> tuple[Allocation, ...]:
        if not self.allocations:
            raise ValueError("the global parametrization needs the rules' allocations on the dense model "
                             "(SearchSpace.with_allocations); none are set")
        return self.allocations

    def _shifted_units(self) -> set[str]:
        """The units with a ``<unit>/shift`` parameter: those some rule allocates, when ``spread > 0``."""
        if self.parametrization != "global" or self.spread == 0:
            return set()
        return {name for allocation in self.allocations for name, _ in allocation.units}

    def rule_params(self, rule: str, sparsity: float) -> dict[str, object]:
        """``global`` parametrization: the parameters of ``rule`` at whole-model ``sparsity`` (every shift
        0, blocks kept, trial-wide choices at their first value): the rule's own allocation."""
        params: dict[str, object] = {GLOBAL_RULE_PARAM: rule, GLOBAL_SPARSITY_PARAM: sparsity}
        shifted_units = self._shifted_units()
        for unit in self.units:
            if unit.removal:
                params[f"{unit.name}/remove"] = False
            elif unit.name in shifted_units:
                params[f"{unit.name}/shift"] = 0.0
        return {**params, **self._trial_wide_defaults()}

    def _trial_wide_defaults(self) -> dict[str, object]:
        params: dict[str, object] = {}
        if self.quantize == "search":
            params[QUANTIZE_PARAM] = False
        if len(self.schedules) > 1:
            params[SCHEDULE_PARAM] = self.schedules[0]
        if self.rewind == "search":
            params[REWIND_PARAM] = False
        return params

    def try_decode(self, params: Mapping[str, object]) -> Plan | None:
        """:meth:`decode`, or None when ``params`` lack one of this space's parameters (a trial whose
        driver died while Optuna was writing them, or one of an edited space)."""
        try:
            return self.decode(params)
        except (KeyError, TypeError, ValueError):
            return None

    def uniform_params(self, sparsity: float, method: str | None = None) -> dict[str, object]:
        """Parameters of the trivial baseline: every unit at ``sparsity`` with one method.

        Units the method cannot prune stay dense; removable blocks are kept.
        """
        params: dict[str, object] = {}
        for unit in self.units:
            if unit.removal:
                params[f"{unit.name}/remove"] = False
                continue
            chosen = method if method in unit.methods else unit.methods[0]
            if len(unit.methods) > 1:
                params[f"{unit.name}/method"] = chosen
            applies = method is None or method in unit.methods
            params[f"{unit.name}/sparsity"] = sparsity if applies else self.low
        return {**params, **self._trial_wide_defaults()}

    def allocation_params(self, sparsities: Mapping[str, float], method: str) -> dict[str, object]:
        """Parameters of a per-unit allocation (a baseline rule, :mod:`autoprune.baselines`): each unit
        named in ``sparsities`` at its value with ``method``, every other unit as in
        :meth:`uniform_params` with ``self.low``. Values are kept as given, even outside a unit's range."""
        params = self.uniform_params(self.low, method)
        for unit in self.units:
            if unit.name in sparsities and not unit.removal:
                params[f"{unit.name}/sparsity"] = float(sparsities[unit.name])
        return params
