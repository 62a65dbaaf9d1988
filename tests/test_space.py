"""Search space: units from the model, distributions, decode, include/exclude."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.errors import ConfigError
from autoprune.methods import PruneContext
from autoprune.space import SearchSpace, find_head


def small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def context(model: nn.Module) -> PruneContext:
    return PruneContext(example_inputs=torch.zeros(1, 1, 8, 8), protected=frozenset({find_head(model)}))


def test_head_is_last_linear() -> None:
    assert find_head(small()) == "5"


def test_units_and_distributions() -> None:
    model = small()
    space = SearchSpace.from_model(model, context(model), ["l1_unstructured", "random_unstructured"],
                                   low=0.0, high=0.8, step=0.1)
    assert [u.name for u in space.units] == ["0", "3"]  # the head "5" is protected
    dists = space.distributions()
    assert set(dists) == {"0/method", "0/sparsity", "3/method", "3/sparsity"}
    assert dists["0/method"].choices == ("l1_unstructured", "random_unstructured")
    assert dists["3/sparsity"].low == 0.0 and dists["3/sparsity"].high == 0.8


def test_decode_drops_zero_sparsity_and_keeps_method() -> None:
    model = small()
    space = SearchSpace.from_model(model, context(model), ["l1_unstructured", "random_unstructured"])
    plan = space.decode({"0/method": "random_unstructured", "0/sparsity": 0.5,
                         "3/method": "l1_unstructured", "3/sparsity": 0.0})
    assert [(p.layer, p.method, p.sparsity) for p in plan.layers] == [("0", "random_unstructured", 0.5)]
    assert plan.quantize is False


def test_single_method_has_no_choice_param() -> None:
    model = small()
    space = SearchSpace.from_model(model, context(model), ["l1_unstructured"], exclude=["0"])
    assert set(space.distributions()) == {"3/sparsity"}
    assert space.uniform_params(0.5) == {"3/sparsity": 0.5}


def test_pattern_matching_nothing_is_an_error() -> None:
    model = small()
    with pytest.raises(ConfigError, match=r"field 'space.exclude': pattern 'conv\*' matches no prunable unit"):
        SearchSpace.from_model(model, context(model), ["l1_unstructured"], exclude=["conv*"])
    with pytest.raises(ConfigError, match="no prunable unit left"):
        SearchSpace.from_model(model, context(model), ["l1_unstructured"], exclude=["*"])


def test_quantize_search_dimension() -> None:
    model = small()
    space = SearchSpace.from_model(model, context(model), ["l1_unstructured"], quantize="search")
    assert "quantize" in space.distributions()
    assert space.decode({"0/sparsity": 0.1, "3/sparsity": 0.2, "quantize": True}).quantize is True


def test_schedule_and_rewind_dimensions() -> None:
    model = small()
    fixed = SearchSpace.from_model(model, context(model), ["l1_unstructured"], schedules=("iterative",),
                                   iterative_rounds=4, rewind="always")
    assert set(fixed.distributions()) == {"0/sparsity", "3/sparsity"}  # no choice left to the search
    plan = fixed.decode({"0/sparsity": 0.5, "3/sparsity": 0.0})
    assert (plan.schedule, plan.rounds, plan.rewind) == ("iterative", 4, True)
    space = SearchSpace.from_model(model, context(model), ["l1_unstructured"], schedules=("oneshot", "iterative"),
                                   rewind="search")
    dists = space.distributions()
    assert dists["schedule"].choices == ("oneshot", "iterative") and dists["rewind"].choices == (False, True)
    plan = space.decode({"0/sparsity": 0.5, "3/sparsity": 0.1, "schedule": "iterative", "rewind": False})
    assert (plan.schedule, plan.rounds, plan.rewind) == ("iterative", 3, False)
    assert (plan.as_params()["schedule"], plan.as_params()["rounds"]) == ("iterative", 3)
    baseline = space.uniform_params(0.3)
    assert baseline["schedule"] == "oneshot" and baseline["rewind"] is False
    assert space.decode(baseline).rounds == 1


def test_quantize_needs_a_linear_layer() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(ConfigError, match=r"field 'space\.quantize'"):
        SearchSpace.from_model(model, context(model), ["l1_unstructured"], quantize="search")


def test_unit_highs_cap_one_unit_and_snap_to_step() -> None:
    model = small()
    space = SearchSpace.from_model(model, context(model), ["l1_unstructured"], low=0.1, high=0.8, step=0.1)
    capped = space.with_unit_highs({"0": 0.47, "3": 0.95})
    dists = capped.distributions()
    assert dists["0/sparsity"].high == pytest.approx(0.4)  # snapped down to the step grid
    assert dists["3/sparsity"].high == pytest.approx(0.8)  # a cap above the range changes nothing
    assert space.with_unit_highs({"0": 0.0}).distributions()["0/sparsity"].high == pytest.approx(0.1)  # >= low


def test_an_n_m_method_decodes_any_sparsity_to_its_one_value() -> None:
    """N:M methods (wanda_2:4 ...) accept one sparsity (N/M zeros): a sampled value > 0 means 'prune N:M',
    0 keeps the unit dense; and they run one-shot only."""
    from autoprune.schedule import supports_iterative

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    context = PruneContext(example_inputs=torch.zeros(1, 16), protected=frozenset({"2"}))
    space = SearchSpace.from_model(model, context, ["wanda_2:4", "l1_unstructured"], low=0.0, high=0.9)
    plan = space.decode({"0/method": "wanda_2:4", "0/sparsity": 0.3})
    assert [(layer.method, layer.sparsity) for layer in plan.layers] == [("wanda_2:4", 0.5)]
    assert space.decode({"0/method": "wanda_2:4", "0/sparsity": 0.0}).layers == ()
    assert space.decode({"0/method": "l1_unstructured", "0/sparsity": 0.3}).layers[0].sparsity == 0.3
    assert not supports_iterative("wanda_2:4") and supports_iterative("wanda")
