"""The simple-rule baselines (uniform, global magnitude, global structured) as per-unit allocations."""

from __future__ import annotations

import optuna
import pytest
import torch

from autoprune.baselines import global_magnitude, global_structured, seed_trials
from autoprune.config import load_config
from autoprune.errors import ConfigError
from autoprune.methods import PruneContext
from autoprune.space import SearchSpace
from autoprune.study import BASELINE_ATTR
from autoprune.trial import prune_model


def _space_and_context(setup, methods):
    example = next(iter(setup.val_loader))[0][:1]
    context = PruneContext(example_inputs=example, protected=setup.settings.protected, max_layer_sparsity=0.95)
    return SearchSpace.from_model(setup.dense, context, methods, low=0.1, high=0.8), context


def test_global_magnitude_reaches_the_target_over_all_units(tiny_setup) -> None:
    setup = tiny_setup(epochs=0)
    space, context = _space_and_context(setup, ["l1_unstructured"])
    units = [u.name for u in space.units]
    for target in (0.5, 0.9):
        allocation = global_magnitude(setup.dense, units, target, context.max_layer_sparsity)
        assert len(set(allocation.values())) > 1  # not uniform: one threshold, different shares
        assert max(allocation.values()) <= 0.95  # never past the per-layer cap
        plan = space.decode(space.allocation_params(allocation, "l1_unstructured"))
        pruned = prune_model(setup.dense, plan, context)
        weights = [pruned.get_submodule(name).weight for name in units]
        total = sum(w.numel() for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights)
        assert zeros == round(target * total)  # the whole model's sparsity is the rule's target
    # one threshold: every zeroed weight is no larger than any kept one (where no cap held a unit back)
    allocation = global_magnitude(setup.dense, units, 0.5)
    pruned = prune_model(setup.dense, space.decode(space.allocation_params(allocation, "l1_unstructured")),
                         context)
    dense_w = torch.cat([setup.dense.get_submodule(n).weight.abs().flatten() for n in units])
    kept = torch.cat([(pruned.get_submodule(n).weight != 0).flatten() for n in units])
    assert dense_w[~kept].max() <= dense_w[kept].min()


def test_global_structured_reaches_the_target_channel_fraction(tiny_setup) -> None:
    setup = tiny_setup(epochs=0)
    space, context = _space_and_context(setup, ["l1_structured"])
    units = [u.name for u in space.units]
    channels = {n: setup.dense.get_submodule(n).out_channels for n in units}
    allocation = global_structured(setup.dense, units, 0.5, context.example_inputs, context.protected, 0.95)
    pruned = prune_model(setup.dense, space.decode(space.allocation_params(allocation, "l1_structured")), context)
    removed = sum(channels[n] - pruned.get_submodule(n).out_channels for n in units)
    assert removed == round(0.5 * sum(channels.values()))


def test_seed_trials_follow_the_rules_and_methods(tiny_setup) -> None:
    setup = tiny_setup(epochs=0)
    space, context = _space_and_context(setup, ["l1_unstructured", "l1_structured"])
    trials = seed_trials(space, setup.dense, context, ["uniform", "global_magnitude", "global_structured"],
                         [0.5], ["l1_unstructured", "l1_structured"])
    assert [label for label, _ in trials] == ["uniform l1_unstructured 0.5", "global magnitude 0.5",
                                              "global structured 0.5"]
    magnitude, structured = trials[1][1], trials[2][1]
    assert {magnitude[f"{u.name}/method"] for u in space.units if len(u.methods) > 1} == {"l1_unstructured"}
    assert {structured[f"{u.name}/method"] for u in space.units if len(u.methods) > 1} == {"l1_structured"}
    # only structured methods configured: no global magnitude trial
    space_s, _ = _space_and_context(setup, ["l1_structured"])
    labels = [label for label, _ in seed_trials(space_s, setup.dense, context, ["global_magnitude",
                                                                                "global_structured"], [0.5],
                                                ["l1_structured"])]
    assert labels == ["global structured 0.5"]


def test_out_of_range_allocations_are_enqueued_as_computed(tiny_setup) -> None:
    setup = tiny_setup(epochs=0)
    space, context = _space_and_context(setup, ["l1_unstructured"])
    (label, params), = seed_trials(space, setup.dense, context, ["global_magnitude"], [0.25], ["l1_unstructured"])
    values = [params[f"{u.name}/sparsity"] for u in space.units]
    assert any(v < space.low for v in values)  # the small first conv keeps more than the space's low allows
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.enqueue_trial(params, user_attrs={BASELINE_ATTR: label})
    with pytest.warns(UserWarning, match="out of range"):
        trial = study.ask(space.distributions())
    assert trial.params == params  # not clipped
    assert trial.user_attrs[BASELINE_ATTR] == "global magnitude 0.25"


def test_baseline_rules_config_is_validated(tiny_project) -> None:
    config = load_config(tiny_project)
    assert config.study.baseline_rules == ["uniform", "global_magnitude", "global_structured"]
    with pytest.raises(ConfigError, match="unknown baseline rule 'global'; known rules: uniform, "
                                          "global_magnitude, global_structured"):
        load_config(tiny_project, ["study.baseline_rules=[uniform, global]"])


def test_a_unit_over_the_cap_is_held_there_and_the_rest_goes_elsewhere() -> None:
    from autoprune.baselines import _allocate

    scores = {"small": torch.arange(10.0) / 100, "large": torch.arange(10.0) + 1}
    assert _allocate(scores, 0.5, cap=1.0) == {"small": 9, "large": 1}  # at least one part of a unit stays
    assert _allocate(scores, 0.5, cap=0.8) == {"small": 8, "large": 2}  # the total is still half


def test_unstructured_rules_default_to_higher_sparsities(tiny_setup, tiny_project) -> None:
    """Zeroing single weights keeps about the parameters that removing a quarter / half / three quarters of
    the channels leaves at 0.5 / 0.75 / 0.9: so by default the unstructured rules sit there."""
    config = load_config(tiny_project, ["study.baselines=null", "space.sparsity={low: 0.1, high: 0.9}"])
    assert config.baseline_sparsities == [0.25, 0.5, 0.75]
    assert config.unstructured_baseline_sparsities == [0.5, 0.75, 0.9]
    assert load_config(tiny_project, ["study.baselines=[0.3]"]).unstructured_baseline_sparsities == [0.3]
    setup = tiny_setup(epochs=0)
    space, context = _space_and_context(setup, ["l1_unstructured", "l1_structured"])
    labels = [label for label, _ in seed_trials(space, setup.dense, context, list(config.study.baseline_rules),
                                                config.baseline_sparsities, ["l1_unstructured", "l1_structured"],
                                                unstructured_sparsities=config.unstructured_baseline_sparsities)]
    assert labels == ["uniform l1_unstructured 0.5", "uniform l1_unstructured 0.75", "uniform l1_unstructured 0.9",
                      "global magnitude 0.5", "global magnitude 0.75", "global magnitude 0.9",
                      "global structured 0.25", "global structured 0.5", "global structured 0.75"]
