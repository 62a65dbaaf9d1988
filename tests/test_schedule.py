"""Schedules (one-shot / iterative AGP), lottery-ticket rewinding, and a search that mixes them."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import torch
from zoo import ZOO

from autoprune import schedule
from autoprune.config import load_config
from autoprune.errors import AutopruneError, ConfigError
from autoprune.inputs import build_inputs, ensure_dense, rewind_file
from autoprune.methods import PruneContext
from autoprune.model_files import load_model, load_weights
from autoprune.plan import LayerPlan, Plan
from autoprune.quantize import quantized_linears
from autoprune.search import run_search
from autoprune.space import SearchSpace
from autoprune.training import TrainSettings, train
from autoprune.trial import TrialSettings, measure_dense, prune_and_finetune, run_trial


def test_agp_values_and_step_split() -> None:
    assert schedule.agp_schedule(0.8, 3) == pytest.approx([0.8 * (1 - (2 / 3) ** 3), 0.8 * (1 - (1 / 3) ** 3), 0.8])
    assert schedule.agp_schedule(0.5, 1) == [0.5]
    assert schedule.agp_sparsity(0.9, 0, 4) == 0.0
    assert schedule.relative_ratio(0.5, 0.75) == pytest.approx(0.5)  # half of what is left
    assert schedule.split_steps(10, 3) == [3, 3, 4] and sum(schedule.split_steps(7, 7)) == 7
    batches = [(torch.zeros(1), torch.zeros(1))] * 4
    assert sum(1 for _ in schedule._Steps(batches, 10, None)) == 10  # wraps around the loader
    assert sum(1 for _ in schedule._Steps([], 5, None)) == 0
    # the same total budget as one-shot: epochs x batches (max_batches applied), split over rounds
    assert schedule.round_steps(batches, TrainSettings(epochs=2, max_batches=3), 4) == [1, 1, 2, 2]


def _context(entry, round_to=None) -> PruneContext:
    return PruneContext(example_inputs=entry.example(2), calibration_batches=entry.batches(2, 4),
                        protected=frozenset({entry.head}), max_layer_sparsity=0.95, round_to=round_to)


def _plan_all(entry, model, context, methods, sparsity):
    layers: list[LayerPlan] = []
    for method in methods:
        for unit in SearchSpace.from_model(model, context, [method]).units:
            if all(item.layer != unit.name for item in layers):
                layers.append(LayerPlan(unit.name, method, 1.0 if method == "remove_block" else sparsity))
                if method == "remove_block":
                    break
    return tuple(layers)


def test_iterative_reaches_exactly_what_oneshot_reaches() -> None:
    entry = ZOO["resnet"]
    dense = entry.build()
    context = _context(entry, round_to=2)
    layers = _plan_all(entry, dense, context, ["l1_structured", "l1_unstructured"], 0.7)
    settings = TrialSettings(finetune=TrainSettings(epochs=0), protected=context.protected)
    batches = context.calibration_batches
    oneshot, _ = prune_and_finetune(dense, batches, Plan(layers), settings, context)
    iterative, _ = prune_and_finetune(dense, batches, Plan(layers, schedule="iterative", rounds=3), settings, context)
    shapes = {k: v.shape for k, v in oneshot.state_dict().items()}
    assert shapes == {k: v.shape for k, v in iterative.state_dict().items()}  # same channels per group
    assert shapes != {k: v.shape for k, v in dense.state_dict().items()}
    for item in layers:
        if item.method == "l1_unstructured":
            a, b = oneshot.get_submodule(item.layer).weight, iterative.get_submodule(item.layer).weight
            assert int((a == 0).sum()) == int((b == 0).sum()) == round(0.7 * a.numel())


def test_iterative_counts_convert_to_relative_ratios() -> None:
    entry = ZOO["mlp"]
    model = entry.build()
    context = _context(entry)
    plan = Plan((LayerPlan("body.0", "l1_structured", 0.75), LayerPlan("body.3", "l1_unstructured", 0.6)),
                schedule="iterative", rounds=3)
    steps = schedule.Schedule(model, plan, context)
    sizes = [32]
    for step in (1, 2, 3):
        targets = steps.targets(step)
        wanted = round(32 * schedule.agp_schedule(0.75, 3)[step - 1])
        assert targets["l1_structured"]["body.0"] == pytest.approx((wanted - (32 - sizes[-1])) / sizes[-1])
        assert targets["l1_unstructured"]["body.3"] == pytest.approx(schedule.agp_schedule(0.6, 3)[step - 1])
        steps.record(schedule.prune_step(model, targets, steps.step_context(step)))
        sizes.append(model.body[0].out_features)
    assert sizes == [32, 32 - round(32 * 0.75 * (1 - (2 / 3) ** 3)), 32 - round(32 * 0.75 * (26 / 27)), 8]
    steps.check(model)
    steps.items[0].removed -= 1  # pretend one channel fewer was removed: never reported as reached
    with pytest.raises(AutopruneError, match="does not reach its plan"):
        steps.check(model)


@pytest.mark.parametrize(("name", "methods"), [
    ("resnet", ["remove_block", "l1_structured", "l1_unstructured"]),
    ("transformer", ["attention_heads", "mlp_neurons", "l1_unstructured"]),
    ("hf", ["attention_heads", "mlp_neurons"]),
])
def test_rewinding_maps_early_weights_through_the_surgery(name, methods) -> None:
    """Early weights = 2 x trained weights: then every surviving rewound value must be exactly twice the
    value the same pruning (without rewinding) kept, channel by channel, head by head, zero by zero."""
    entry = ZOO[name]
    dense = entry.build()
    context = _context(entry)
    layers = _plan_all(entry, dense, context, methods, 0.5)
    early = {k: 2 * v for k, v in dense.state_dict().items()}
    for rounds in (1, 2) if name == "resnet" else (2,):  # round 1 of 2 replays like one-shot
        kind = "iterative" if rounds > 1 else "oneshot"
        settings = TrialSettings(finetune=TrainSettings(epochs=0), protected=context.protected, rewind_state=early)
        torch.manual_seed(0)
        pruned, _ = prune_and_finetune(dense, context.calibration_batches, Plan(layers, schedule=kind, rounds=rounds),
                                       settings, context)
        torch.manual_seed(0)
        rewound, _ = prune_and_finetune(dense, context.calibration_batches,
                                        Plan(layers, schedule=kind, rounds=rounds, rewind=True), settings, context)
        kept, back = pruned.state_dict(), rewound.state_dict()
        assert kept.keys() == back.keys()
        assert [k for k in kept if not torch.equal(back[k], 2 * kept[k])] == []
        assert any(kept[k].shape != dense.state_dict().get(k, kept[k]).shape for k in kept)  # it did shrink


def test_rewound_trial_starts_from_early_weights_with_masks_held(tiny, tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = tiny.make_model()
    train_loader, val_loader = tiny.make_loaders()
    early = {k: v.clone() for k, v in dense.state_dict().items()}  # the initial weights (rewind epoch 0)
    train(dense, train_loader, TrainSettings(epochs=2, lr=0.01))
    plan = Plan((LayerPlan("conv2", "l1_unstructured", 0.8), LayerPlan("conv1", "l1_unstructured", 0.5)), rewind=True)
    for epochs in (0, 1):
        settings = TrialSettings(finetune=TrainSettings(epochs=epochs), protected=frozenset({"fc"}),
                                 latency_rounds=1, latency_min_run_time=0.01, rewind_state=early)
        baseline = measure_dense(dense, val_loader, settings, min_run_time=0.02)
        output = run_trial(dense, train_loader, val_loader, plan, settings, baseline)
        assert output.result.extra["rewound"] == 1.0
        (tmp_path / "weights.pt").write_bytes(output.weights)
        weights = load_weights(tmp_path / "weights.pt")
        for item in plan.layers:
            w, trained = weights[f"{item.layer}.weight"], dense.get_submodule(item.layer).weight.detach()
            keep = trained.abs().flatten().argsort()[round(item.sparsity * trained.numel()):]  # chosen from trained
            mask = torch.zeros(trained.numel(), dtype=torch.bool)
            mask[keep] = True
            mask = mask.view_as(trained)
            assert torch.equal(w == 0, ~mask)  # the mask chosen from trained weights, held through fine-tuning
            if epochs == 0:
                assert torch.equal(w, early[f"{item.layer}.weight"] * mask)
            else:
                assert not torch.equal(w, early[f"{item.layer}.weight"] * mask)
        if epochs == 0:
            assert torch.equal(weights["fc.weight"], early["fc.weight"])  # every weight is rewound


def test_iterative_trial_completes(tiny_setup) -> None:
    setup = tiny_setup(epochs=1)
    plan = Plan((LayerPlan("conv1", "l1_structured", 0.5), LayerPlan("conv2", "l1_unstructured", 0.7)),
                schedule="iterative", rounds=3, quantize=True)
    result = setup.run(plan).result
    assert result.extra["rounds"] == 3.0 and result.extra["quantized"] == 1.0
    assert result.params < setup.baseline.params and result.train_seconds > 0
    assert 0 <= result.accuracy <= 1


def test_rewind_needs_early_weights(tiny, tiny_project: Path) -> None:
    with pytest.raises(ConfigError, match=r"space\.rewind_epoch"):
        build_inputs(load_config(tiny_project, ["space.rewind=always", "space.rewind_epoch=6"]))
    torch.save(tiny.make_model().state_dict(), tiny_project.parent / "dense.pt")
    torch.manual_seed(1)
    early = tiny.make_model().state_dict()
    torch.save(early, tiny_project.parent / "early.pt")
    config = tiny_project.parent / "ckpt.yaml"
    config.write_text(tiny_project.read_text().replace("pretrain: {epochs: 6, lr: 0.01}", "checkpoint: dense.pt"))
    with pytest.raises(ConfigError, match="needs early weights"):
        build_inputs(load_config(config, ["space.rewind=search"]))
    inputs = build_inputs(load_config(config, ["space.rewind=search", "space.rewind_checkpoint=early.pt"]))
    assert all(torch.equal(v, inputs.settings.rewind_state[k]) for k, v in early.items())
    with pytest.raises(ConfigError, match="rewind_checkpoint"):
        load_config(tiny_project, ["space.rewind_checkpoint=early.pt"])


def test_pretraining_keeps_the_rewind_point_without_changing_the_dense_model(tiny_project: Path) -> None:
    overrides = ["model.pretrain.epochs=2", "space.rewind=always", "space.rewind_epoch=1"]
    config = load_config(tiny_project, overrides)
    torch.manual_seed(0)
    inputs = build_inputs(config)
    dense = ensure_dense(config, inputs)
    assert rewind_file(config).is_file()
    torch.manual_seed(0)
    again = build_inputs(config)  # same init, fresh loaders
    reference = copy.deepcopy(again.model)
    torch.manual_seed(config.study.seed)
    train(reference, again.train_loader, TrainSettings(epochs=1, lr=0.01))
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in inputs.settings.rewind_state.items())
    train_more = TrainSettings(epochs=2, lr=0.01)
    torch.manual_seed(0)
    plain = build_inputs(load_config(tiny_project, ["model.pretrain.epochs=2"]))
    torch.manual_seed(config.study.seed)
    train(plain.model, plain.train_loader, train_more)
    assert all(torch.equal(v, plain.model.state_dict()[k]) for k, v in dense.state_dict().items())
    reloaded = build_inputs(config)  # a second run (resume) reads both files
    ensure_dense(config, reloaded)
    assert all(torch.equal(v, reloaded.settings.rewind_state[k]) for k, v in inputs.settings.rewind_state.items())


def test_search_mixes_quantization_schedules_and_rewinding(tiny_project: Path) -> None:
    config = load_config(tiny_project, [
        "execution.backend=in_process", "study.n_trials=4", "model.pretrain.epochs=2",
        "space.methods=[l1_unstructured, l1_structured]", "space.quantize=search",
        "space.schedules=[oneshot, iterative]", "space.iterative_rounds=2", "space.rewind=search",
        "space.rewind_epoch=1", "latency.rounds=1",
    ])
    summary = run_search(config)
    assert (summary.completed, summary.failed) == (4, 0)
    study = optuna.load_study(study_name="tiny", storage=config.storage_url)
    params = [t.params for t in study.trials]
    for key in ("quantize", "schedule", "rewind"):
        assert len({p[key] for p in params}) == 2, (key, params)  # both choices were tried
    for trial in study.trials:
        model = load_model(config.trial_path(trial.number))
        assert bool(quantized_linears(model)) == trial.params["quantize"]
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
