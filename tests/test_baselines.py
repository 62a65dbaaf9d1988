"""The simple-rule baselines (uniform with each baseline method, global magnitude, global structured, OWL) as
per-unit allocations."""

from __future__ import annotations

import json
import logging

import optuna
import pytest
import torch
from torch import nn
from zoo import tiny_decoder

from autoprune.baselines import allocation_curves, global_magnitude, global_structured, seed_trials
from autoprune.config import load_config
from autoprune.errors import ConfigError
from autoprune.methods import PruneContext
from autoprune.owl import decoder_blocks, layer_targets, owl_allocation
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
                                          "global_magnitude, global_structured, owl"):
        load_config(tiny_project, ["study.baseline_rules=[uniform, global]"])
    assert load_config(tiny_project, ["study.baseline_rules=[owl]"]).study.baseline_rules == ["owl"]


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


# --------------------------------------------------------------------------- decoder LLMs: baseline methods, OWL


def _tiny_llama(batches: int = 2) -> tuple[nn.Module, PruneContext]:
    """A tiny 4-block Llama (tests/zoo.py) with outlier input features planted in blocks 1 and 3, so that OWL's
    allocation is not uniform, and ``batches`` calibration batches of random token ids."""
    pytest.importorskip("transformers")
    dense = tiny_decoder("llama", layers=4)
    with torch.no_grad():
        for index in (1, 3):
            block = dense.model.layers[index]
            block.input_layernorm.weight[:4] *= 20
            block.post_attention_layernorm.weight[:4] *= 20
    ids = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    calibration = [(x, x) for x in ids.split(2)][:batches]
    return dense, PruneContext(example_inputs=ids[:1], calibration_batches=calibration,
                               protected=frozenset({"lm_head"}), max_layer_sparsity=0.95)


def test_baseline_methods_give_one_uniform_trial_per_method_and_level() -> None:
    dense, context = _tiny_llama()
    methods = ["attention_heads", "l1_unstructured", "wanda", "wanda_2:4"]
    space = SearchSpace.from_model(dense, context, methods, low=0.0, high=0.75)
    trials = dict(seed_trials(space, dense, context, ["uniform"], [0.25, 0.5], methods,
                              unstructured_sparsities=[0.5, 0.75],
                              baseline_methods=["wanda", "wanda_2:4", "attention_heads"]))
    # unstructured methods at the unstructured levels, the 2:4 method once (at its one sparsity), heads at the others
    assert list(trials) == ["uniform wanda 0.5", "uniform wanda 0.75", "uniform wanda_2:4 0.5",
                            "uniform attention_heads 0.25", "uniform attention_heads 0.5"]
    for label, method, sparsity, units in (("uniform wanda 0.75", "wanda", 0.75, 28),
                                           ("uniform wanda_2:4 0.5", "wanda_2:4", 0.5, 28),
                                           ("uniform attention_heads 0.25", "attention_heads", 0.25, 4)):
        layers = space.decode(trials[label]).layers
        assert {(layer.method, layer.sparsity) for layer in layers} == {(method, sparsity)}
        assert len(layers) == units  # every unit the method prunes, and only those
    # default: the first configured method only, as before baseline_methods
    assert [label for label, _ in seed_trials(space, dense, context, ["uniform"], [0.25, 0.5], methods,
                                              unstructured_sparsities=[0.5, 0.75])] == [
        "uniform attention_heads 0.25", "uniform attention_heads 0.5"]
    # no levels, no trials: not even the N:M one
    assert seed_trials(space, dense, context, ["uniform"], [], methods, unstructured_sparsities=[],
                       baseline_methods=["wanda_2:4"]) == []


def test_baseline_methods_must_be_configured_methods(tiny_project) -> None:
    assert load_config(tiny_project).study.baseline_methods is None  # space.methods: [l1_unstructured, l1_structured]
    config = load_config(tiny_project, ["study.baseline_methods=[l1_structured, l1_unstructured]"])
    assert config.study.baseline_methods == ["l1_structured", "l1_unstructured"]
    with pytest.raises(ConfigError, match=r"field 'study.baseline_methods': method 'wanda' is not among "
                                          r"space.methods \(l1_unstructured, l1_structured\)"):
        load_config(tiny_project, ["study.baseline_methods=[l1_unstructured, wanda]"])
    with pytest.raises(ConfigError, match=r"field 'study.baseline_methods': .* no 'uniform'"):
        load_config(tiny_project, ["study.baseline_methods=[l1_unstructured]", "study.baseline_rules=[owl]"])
    with pytest.raises(ConfigError, match=r"field 'study.baseline_methods': .*expected each method once"):
        load_config(tiny_project, ["study.baseline_methods=[l1_unstructured, l1_unstructured]"])


def test_owl_rule_enqueues_owl_allocation_over_the_method_units(caplog: pytest.LogCaptureFixture) -> None:
    dense, context = _tiny_llama()
    methods = ["attention_heads", "l1_unstructured", "wanda"]
    space = SearchSpace.from_model(dense, context, methods, low=0.0, high=0.9)
    with caplog.at_level(logging.WARNING, logger="autoprune"):  # at 0.02, lambda 0.08 pushes a block below 0
        trials = seed_trials(space, dense, context, ["owl"], [0.25], methods, unstructured_sparsities=[0.02, 0.5])
    assert "baseline rule owl at 0.02 skipped: ValueError" in caplog.text
    (label, params), = trials
    assert label == "owl 0.5"  # at the unstructured level
    expected = layer_targets(dense, owl_allocation(dense, context.calibration_batches, 0.5,
                                                   protected=context.protected), context.protected)
    units = [u.name for u in space.units if "wanda" in u.methods]
    assert len(units) == 28 and {u: params[f"{u}/sparsity"] for u in units} == expected
    assert {params[f"{u}/method"] for u in units} == {"wanda"}  # preferred to l1_unstructured
    assert {params[f"{u.name}/sparsity"] for u in space.units if u.methods == ("attention_heads",)} == {0.0}
    blocks = [{params[f"{u}/sparsity"] for u in members} for members in decoder_blocks(dense, units).values()]
    assert [len(values) for values in blocks] == [1, 1, 1, 1]  # one sparsity per decoder block
    per_block = [values.pop() for values in blocks]
    assert sum(per_block) / 4 == pytest.approx(0.5, abs=1e-9)  # the unweighted block mean is the target
    assert max(per_block[1], per_block[3]) < min(per_block[0], per_block[2])  # outliers: less sparsity
    # the blocks have equal layers, so the pruned model's sparsity over those layers is the target too
    pruned = prune_model(dense, space.decode(params), context)
    weights = [pruned.get_submodule(u).weight for u in units]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=1e-3)


def test_owl_rule_is_skipped_where_it_cannot_apply(caplog: pytest.LogCaptureFixture) -> None:
    dense, context = _tiny_llama(batches=0)
    methods = ["attention_heads", "wanda", "wanda_2:4"]
    space = SearchSpace.from_model(dense, context, methods, low=0.0, high=0.9)
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        trials = seed_trials(space, dense, context, ["uniform", "owl"], [0.5], methods, baseline_methods=["wanda"])
    assert [label for label, _ in trials] == ["uniform wanda 0.5"]
    assert "baseline rule owl skipped: its allocation needs calibration batches" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autoprune"):  # an N:M method cannot follow an allocation
        assert seed_trials(space, dense, context, ["owl"], [0.5], ["attention_heads", "wanda_2:4"]) == []
    assert "baseline rule owl skipped: it prunes with one of wanda, sparsegpt, l1_unstructured, l2_unstructured" \
        in caplog.text


def test_the_compact_space_holds_baseline_methods_and_owl(caplog: pytest.LogCaptureFixture) -> None:
    dense, context = _tiny_llama()
    methods = ["sparsegpt", "l1_unstructured", "wanda"]
    space = SearchSpace.from_model(dense, context, methods, low=0.0, high=0.9, parametrization="global")
    curves = allocation_curves(space, dense, context, methods, [0.0, 0.25, 0.5, 0.75, 0.9],
                               baseline_methods=["sparsegpt", "wanda"], owl=True)
    space = space.with_allocations(curves)
    assert [(a.rule, a.method) for a in space.allocations] == [
        ("uniform", "sparsegpt"), ("uniform_wanda", "wanda"), ("global_magnitude", "l1_unstructured"), ("owl", "wanda")]
    owl = next(a for a in space.allocations if a.rule == "owl")
    assert len(owl.units) == 28  # every layer of the 4 blocks (lm_head protected)
    # the ratios are computed once and the allocation is linear in the target: at a grid point and between two,
    # the curve is OWL's own allocation, where no block is clipped
    for target in (0.5, 0.6):
        expected = layer_targets(dense, owl_allocation(dense, context.calibration_batches, target,
                                                       protected=context.protected), context.protected)
        assert owl.at(target) == pytest.approx(expected, abs=1e-6)
    # near the ends blocks are clipped into [0, max_layer_sparsity]: the mean is off the target there
    at_zero, at_top = owl.at(0.0), owl.at(0.9)
    assert min(at_zero.values()) == 0.0 and sum(at_zero.values()) / 28 > 0.0
    assert max(at_top.values()) == 0.95 and sum(at_top.values()) / 28 < 0.9
    # the seed trials are the rules' points, labelled as in per_unit
    trials = dict(seed_trials(space, dense, context, ["uniform", "global_magnitude", "owl"], [0.25], methods,
                              unstructured_sparsities=[0.5], baseline_methods=["sparsegpt", "wanda"]))
    assert list(trials) == ["uniform sparsegpt 0.5", "uniform wanda 0.5", "global magnitude 0.5", "owl 0.5"]
    assert trials["uniform wanda 0.5"] == space.rule_params("uniform_wanda", 0.5)
    assert trials["owl 0.5"] == space.rule_params("owl", 0.5)
    owl_plan = {layer.layer: (layer.method, layer.sparsity) for layer in space.decode(trials["owl 0.5"]).layers}
    assert owl_plan == {name: ("wanda", pytest.approx(value, abs=1e-6)) for name, value in owl.at(0.5).items()}
    uniform_plan = space.decode(trials["uniform wanda 0.5"]).layers
    assert len(uniform_plan) == 28 and {(layer.method, layer.sparsity) for layer in uniform_plan} == {("wanda", 0.5)}
    # an N:M method cannot follow an allocation: no uniform rule with it, said in the log
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        labels = [label for label, _ in seed_trials(space, dense, context, ["uniform"], [0.5], methods,
                                                    baseline_methods=["wanda", "wanda_2:4"])]
    assert labels == ["uniform wanda 0.5"]
    assert "study.baseline_methods ['wanda_2:4'] skipped: space.parametrization 'global'" in caplog.text
    nm_methods = ["wanda", "wanda_2:4"]
    nm_space = SearchSpace.from_model(dense, context, nm_methods, parametrization="global")
    assert [a["rule"] for a in allocation_curves(nm_space, dense, context, nm_methods, [0.5],
                                                 baseline_methods=nm_methods)] == ["uniform", "global_magnitude"]


def test_a_compact_space_stored_without_the_new_rules_still_decodes(caplog: pytest.LogCaptureFixture) -> None:
    """A study made before baseline methods and OWL were rules of the compact space stored its uniform and global
    rules only; it decodes and seeds from those, and says which asked-for baselines have no point there."""
    dense, context = _tiny_llama()
    methods = ["wanda", "l1_unstructured"]
    space = SearchSpace.from_model(dense, context, methods, low=0.0, high=0.9, parametrization="global")
    stored = json.loads(json.dumps(allocation_curves(space, dense, context, methods, [0.0, 0.5, 0.9])))
    assert [a["rule"] for a in stored] == ["uniform", "global_magnitude"]  # what such a study holds
    space = space.with_allocations(stored)
    with caplog.at_level(logging.WARNING, logger="autoprune"):
        trials = seed_trials(space, dense, context, ["uniform", "owl"], [0.5], methods,
                             baseline_methods=["wanda", "l1_unstructured"])
    assert [label for label, _ in trials] == ["uniform wanda 0.5"]
    assert "baseline rule owl skipped: the compact search space has no owl rule" in caplog.text
    assert "study.baseline_methods ['l1_unstructured'] skipped: the compact search space has no uniform rule" \
        in caplog.text
    plan = space.decode(space.rule_params("global_magnitude", 0.5))
    assert len(plan.layers) == 28 and {layer.method for layer in plan.layers} == {"l1_unstructured"}
