"""The compact ``global`` parametrization: a whole-model sparsity and a rule, shifted per unit."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

import autoprune
from autoprune.baselines import allocation_curves, global_magnitude, global_structured, seed_trials
from autoprune.config import load_config
from autoprune.errors import ConfigError
from autoprune.methods import PruneContext
from autoprune.space import GLOBAL_RULE_PARAM, GLOBAL_SPARSITY_PARAM, SearchSpace, shifted
from autoprune.study import ALLOCATIONS_ATTR, BASELINE_ATTR

METHODS = ["l1_unstructured", "l1_structured"]
GRID = [0.0, 0.25, 0.5, 0.75, 0.9]


def _global_space(setup, spread: float = 1.0) -> tuple[SearchSpace, PruneContext]:
    example = next(iter(setup.val_loader))[0][:1]
    context = PruneContext(example_inputs=example, protected=setup.settings.protected, max_layer_sparsity=0.95)
    space = SearchSpace.from_model(setup.dense, context, METHODS, low=0.0, high=0.9,
                                   parametrization="global", spread=spread)
    return space.with_allocations(allocation_curves(space, setup.dense, context, METHODS, GRID)), context


def _unit_sparsities(space: SearchSpace, params: dict) -> dict[str, float]:
    return {layer.layer: layer.sparsity for layer in space.decode(params).layers}


def test_the_rules_are_points_of_the_space(tiny_setup) -> None:
    setup = tiny_setup(epochs=0)
    space, context = _global_space(setup)
    assert [a.rule for a in space.allocations] == ["uniform", "global_magnitude", "global_structured"]
    units = {a.rule: [name for name, _ in a.units] for a in space.allocations}
    expected = {"global_magnitude": global_magnitude(setup.dense, units["global_magnitude"], 0.5, 0.95),
                "global_structured": global_structured(setup.dense, units["global_structured"], 0.5,
                                                       context.example_inputs, context.protected, 0.95)}
    for rule, allocation in expected.items():
        got = _unit_sparsities(space, space.rule_params(rule, 0.5))
        assert got == pytest.approx({k: v for k, v in allocation.items() if v > 0}, abs=1e-6)
        methods = {layer.method for layer in space.decode(space.rule_params(rule, 0.5)).layers}
        assert methods == {"l1_unstructured" if rule == "global_magnitude" else "l1_structured"}
    assert set(_unit_sparsities(space, space.rule_params("uniform", 0.5)).values()) == {0.5}


def test_between_grid_points_the_allocation_is_interpolated(tiny_setup) -> None:
    space, _ = _global_space(tiny_setup(epochs=0))
    low, mid, high = (_unit_sparsities(space, space.rule_params("global_magnitude", s)) for s in (0.5, 0.6, 0.75))
    for unit in mid:
        assert low[unit] <= mid[unit] <= high[unit]
        assert mid[unit] == pytest.approx(low[unit] + 0.4 * (high[unit] - low[unit]), abs=1e-6)


def test_a_shift_moves_one_unit_and_caps_hold(tiny_setup) -> None:
    space, _ = _global_space(tiny_setup(epochs=0), spread=3.0)
    params = space.rule_params("global_magnitude", 0.5)
    base = _unit_sparsities(space, params)
    unit = next(iter(base))
    up = _unit_sparsities(space, {**params, f"{unit}/shift": 1.0})
    assert up[unit] == pytest.approx(shifted(base[unit], 1.0), abs=1e-6) and up[unit] > base[unit]
    assert {k: v for k, v in up.items() if k != unit} == {k: v for k, v in base.items() if k != unit}
    top = _unit_sparsities(space, {**params, **{f"{u}/shift": 3.0 for u in base}})
    assert max(top.values()) <= 0.95  # never past max_layer_sparsity
    capped = space.with_unit_highs({unit: 0.3})
    assert _unit_sparsities(capped, {**params, f"{unit}/shift": 3.0})[unit] == 0.3  # a sensitivity cap holds too


def test_distributions_and_what_a_space_without_allocations_does(tiny_setup) -> None:
    setup = tiny_setup(epochs=0)
    space, context = _global_space(setup)
    dists = space.distributions()
    assert dists[GLOBAL_RULE_PARAM].choices == ("uniform", "global_magnitude", "global_structured")
    assert (dists[GLOBAL_SPARSITY_PARAM].low, dists[GLOBAL_SPARSITY_PARAM].high) == (0.0, 0.9)
    shifts = sorted(k for k in dists if k.endswith("/shift"))
    assert shifts and all((dists[k].low, dists[k].high) == (-1.0, 1.0) for k in shifts)
    assert not any(k.endswith(("/sparsity", "/method")) for k in dists if not k.startswith("global/"))
    rules_only, _ = _global_space(setup, spread=0.0)
    assert sorted(rules_only.distributions()) == [GLOBAL_RULE_PARAM, GLOBAL_SPARSITY_PARAM]
    bare = SearchSpace.from_model(setup.dense, context, METHODS, parametrization="global")
    with pytest.raises(ValueError, match="needs the rules' allocations"):
        bare.distributions()
    assert bare.try_decode(space.rule_params("uniform", 0.5)) is None
    assert space.try_decode({GLOBAL_RULE_PARAM: "uniform"}) is None  # partial parameters: no plan
    assert space.try_decode({**space.rule_params("uniform", 0.5), GLOBAL_RULE_PARAM: "lottery"}) is None


def test_seed_trials_in_the_compact_space_are_the_rule_points(tiny_setup) -> None:
    setup = tiny_setup(epochs=0)
    space, context = _global_space(setup)
    trials = seed_trials(space, setup.dense, context, ["uniform", "global_magnitude"], [0.25, 0.5], METHODS)
    assert [label for label, _ in trials] == ["uniform l1_unstructured 0.25", "uniform l1_unstructured 0.5",
                                              "global magnitude 0.25", "global magnitude 0.5"]
    assert trials[3][1] == space.rule_params("global_magnitude", 0.5)


def test_allocation_spread_needs_the_global_parametrization(tiny_project: Path) -> None:
    with pytest.raises(ConfigError, match=r"space.*allocation_spread is 0.5 but parametrization is not 'global'"):
        load_config(tiny_project, ["space.allocation_spread=0.5"])
    with pytest.raises(ConfigError, match="parametrization"):
        load_config(tiny_project, ["space.parametrization=layerwise"])
    config = load_config(tiny_project, ["space.parametrization=global", "space.allocation_spread=0"])
    assert (config.space.parametrization, config.space.allocation_spread) == ("global", 0.0)


def test_a_global_search_runs_resumes_and_holds_its_rules(tiny, tiny_project: Path) -> None:
    overrides = ["space.parametrization=global", "study.baselines=[0.5]", "study.n_trials=5",
                 "execution.backend=in_process", "tracking.log_models=false"]
    search = autoprune.Search(tiny_project, overrides=overrides)
    search.run()
    study = search.study
    stored = study.user_attrs[ALLOCATIONS_ATTR]
    assert [a["rule"] for a in stored] == ["uniform", "global_magnitude", "global_structured"]
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(trials) == 5
    labels = [t.user_attrs.get(BASELINE_ATTR) for t in trials[:3]]
    assert labels == ["uniform l1_unstructured 0.5", "global magnitude 0.5", "global structured 0.5"]
    sampled = trials[3:]
    assert all(GLOBAL_SPARSITY_PARAM in t.params and any(k.endswith("/shift") for k in t.params) for t in sampled)
    search.resume(n_trials=6)
    assert len(search.study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 6
    assert search.study.user_attrs[ALLOCATIONS_ATTR] == stored  # decided once, when the study was created
    assert search.front()  # the front decodes its plans through the stored allocations
