"""Recovery per fine-tuning epoch (distillation, learning-rate schedules, BatchNorm recalibration) and
multi-fidelity screening of pruned models before fine-tuning."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from zoo import ZOO

from autoprune.config import config_from_mapping
from autoprune.errors import ConfigError
from autoprune.inputs import finetune_settings
from autoprune.plan import LayerPlan, Plan
from autoprune.training import (
    TrainSettings,
    distillation_loss,
    make_optimizer,
    make_scheduler,
    recalibrate_batchnorm,
    train,
)
from autoprune.trial import Screening, measure_dense


def _batches(count: int = 4, batch: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return ZOO["mobilenet"].batches(count=count, batch=batch, seed=seed)


def test_distillation_from_itself_costs_nothing() -> None:
    torch.manual_seed(0)
    model = ZOO["mobilenet"].build().eval()
    inputs, targets = _batches(1)[0]
    with torch.no_grad():
        outputs = model(inputs)
    kd = distillation_loss(outputs, outputs.clone(), targets, nn.functional.cross_entropy, 1.0, 4.0)
    assert abs(float(kd)) < 1e-6
    half = distillation_loss(outputs, outputs.clone(), targets, nn.functional.cross_entropy, 0.5, 4.0)
    assert float(half) == pytest.approx(0.5 * float(nn.functional.cross_entropy(outputs, targets)), rel=1e-5)
    # train(): weight 1 with the student's own copy as teacher (BatchNorm off: eval-mode batches differ)
    student = ZOO["transformer"].build()
    loss = train(student, ZOO["transformer"].batches(count=2, batch=8),
                 TrainSettings(epochs=1, lr=0.0, distill_weight=1.0), teacher=copy.deepcopy(student))
    assert loss < 1e-6


def test_distillation_changes_training_and_uses_mse_for_a_user_loss() -> None:
    entry = ZOO["transformer"]
    batches = entry.batches(count=3, batch=8)
    teacher = entry.build(seed=1)
    results = []
    for weight in (0.0, 0.7):
        student = entry.build(seed=0)
        train(student, batches, TrainSettings(epochs=1, lr=1e-2, distill_weight=weight), teacher=teacher)
        results.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert not torch.allclose(results[0], results[1])
    # a user loss (non-classification): the distillation term is the MSE to the teacher's outputs
    out, teacher_out = torch.randn(4, 3), torch.randn(4, 3)
    kd = distillation_loss(out, teacher_out, torch.zeros(4, 3), nn.functional.mse_loss, 1.0, 4.0, classification=False)
    assert float(kd) == pytest.approx(float(nn.functional.mse_loss(out, teacher_out)))


@pytest.mark.parametrize("kind", ["cosine", "onecycle"])
def test_lr_schedules_end_near_zero(kind: str) -> None:
    model = nn.Linear(4, 2)
    settings = TrainSettings(epochs=2, lr=0.1, lr_schedule=kind)
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(5)]
    optimizer = make_optimizer(model.parameters(), settings)
    scheduler = make_scheduler(optimizer, settings, batches)
    assert scheduler is not None and scheduler.total_steps == 10
    peak = 0.0
    for _ in range(9):  # the rate the 10th (last) batch uses
        optimizer.step()
        scheduler.step()
        peak = max(peak, optimizer.param_groups[0]["lr"])
    assert optimizer.param_groups[0]["lr"] < 0.1 * 0.03
    assert peak == pytest.approx(0.1, rel=0.05) if kind == "onecycle" else peak < 0.1
    # train() steps it per batch and never past the end (OneCycleLR raises when stepped too far)
    train(model, batches, settings)
    assert make_scheduler(optimizer, replace(settings, lr_schedule="constant"), batches) is None


def test_bn_recalibration_restores_batch_statistics_of_the_pruned_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model[1].running_mean.fill_(5.0)
    model[1].running_var.fill_(9.0)
    model.eval()
    batch = (torch.randn(16, 3, 8, 8), torch.zeros(16, dtype=torch.long))
    with torch.no_grad():
        model[0].weight[:2] = 0  # "pruned": the old statistics no longer fit
        features = model[0](batch[0])
    assert recalibrate_batchnorm(model, [batch, batch], batches=2) == 2
    mean = features.mean(dim=(0, 2, 3))
    var = features.var(dim=(0, 2, 3), unbiased=True)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, var, atol=1e-4)
    assert model[1].momentum == 0.1 and not model.training
    assert recalibrate_batchnorm(model, [], batches=2) == 0  # an empty loader keeps the statistics
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)


def test_config_validates_and_maps_recovery_options(tmp_path) -> None:
    config = config_from_mapping({"study": {"name": "x"}, "finetune": {
        "distill": {"weight": 0.8, "temperature": 2}, "lr_schedule": "onecycle", "bn_recalibration_batches": 3,
        "screening": {"enabled": True, "min_accuracy_fraction": 0.6}}}, tmp_path)
    settings = finetune_settings(config)
    assert (settings.distill_weight, settings.distill_temperature, settings.lr_schedule) == (0.8, 2.0, "onecycle")
    assert finetune_settings(config_from_mapping({"study": {"name": "x"}}, tmp_path)).distill_weight == 0.0
    for bad in ({"distill": {"weight": 1.5}}, {"distill": {"temperature": 0}}, {"lr_schedule": "step"},
                {"bn_recalibration_batches": -1}, {"screening": {"min_accuracy_fraction": 2}}):
        with pytest.raises(ConfigError, match="finetune"):
            config_from_mapping({"study": {"name": "x"}, "finetune": bad}, tmp_path)


def test_screening_gives_a_hopeless_plan_the_short_budget(tiny_setup) -> None:
    setup = tiny_setup(epochs=2)
    train(setup.dense, setup.train_loader, TrainSettings(epochs=4, lr=0.01))
    settings = replace(setup.settings, screening=Screening(min_accuracy_fraction=0.7, short_fraction=0.25))
    setup.settings = settings
    setup.baseline = measure_dense(setup.dense, setup.val_loader, settings, min_run_time=0.02)
    assert setup.baseline.accuracy > 0.7
    hopeless = setup.run(Plan((LayerPlan("conv1", "l1_structured", 0.95), LayerPlan("conv2", "l1_structured", 0.95))))
    mild = setup.run(Plan((LayerPlan("conv2", "l1_unstructured", 0.2),)))
    assert hopeless.result.extra["screened_accuracy"] < 0.7 * setup.baseline.accuracy
    assert hopeless.result.extra["finetune_epochs_spent"] == pytest.approx(0.5, abs=0.1)  # 25% of 2 epochs
    assert mild.result.extra["screened_accuracy"] >= 0.7 * setup.baseline.accuracy
    assert mild.result.extra["finetune_epochs_spent"] == 2.0
    assert "finetune_epochs_spent" in mild.result.as_metrics()
    iterative = setup.run(Plan((LayerPlan("conv1", "l1_structured", 0.95), LayerPlan("conv2", "l1_structured", 0.95)),
                               schedule="iterative", rounds=2))
    assert iterative.result.extra["finetune_epochs_spent"] == pytest.approx(0.5, abs=0.1)


def test_successive_halving_promotes_only_plans_few_earlier_plans_beat(tiny_setup) -> None:
    """With ``max_dominated`` every one-shot plan first gets the short budget; the rest goes only to plans
    that fewer than ``max_dominated`` rivals beat on both screened accuracy and non-zero parameters."""
    setup = tiny_setup(epochs=2)
    train(setup.dense, setup.train_loader, TrainSettings(epochs=4, lr=0.01))
    halving = Screening(min_accuracy_fraction=0.0, short_fraction=0.25, max_dominated=1)
    setup.settings = replace(setup.settings, screening=halving)
    setup.baseline = measure_dense(setup.dense, setup.val_loader, setup.settings, min_run_time=0.02)
    plan = Plan((LayerPlan("conv2", "l1_unstructured", 0.5),))
    alone = setup.run(plan).result.extra  # no rivals yet: promoted
    assert alone["screened_dominated"] == 0 and alone["finetune_epochs_spent"] == 2.0
    accuracy, nonzero = alone["screened_accuracy"], int(alone["screened_nonzero"])
    better = (min(1.0, accuracy + 0.01), nonzero - 1)  # more accurate and smaller: dominates
    setup.settings = replace(setup.settings, screening=replace(halving, rivals=(better,)))
    beaten = setup.run(plan).result.extra
    assert beaten["screened_dominated"] == 1
    assert beaten["finetune_epochs_spent"] == pytest.approx(0.5, abs=0.1)  # stopped after 25% of 2 epochs
    assert beaten["screened_accuracy"] == accuracy  # the same plan and seed: the same short result
    tied = replace(halving, rivals=((accuracy, nonzero), (accuracy - 0.1, nonzero - 10)))  # neither dominates
    assert tied.dominated_by(accuracy, nonzero) == 0
    assert replace(halving, max_dominated=2, rivals=(better, better)).dominated_by(accuracy, nonzero) == 2


def test_a_search_with_successive_halving_passes_earlier_results_to_trials(tiny, tiny_project) -> None:
    import autoprune

    search = autoprune.Search(tiny_project, overrides=[
        "study.n_trials=5", "execution.backend=in_process", "execution.parallel=1", "tracking.log_models=false",
        "finetune.epochs=2", "finetune.screening={enabled: true, min_accuracy_fraction: 0.0, max_dominated: 1}"])
    search.run()
    extras = [t.user_attrs["autoprune.extra"] for t in search.study.get_trials() if t.state.name == "COMPLETE"]
    assert len(extras) == 5 and extras[0]["screened_dominated"] == 0  # the first trial has no rivals
    for i, extra in enumerate(extras):
        earlier = [(e["screened_accuracy"], int(e["screened_nonzero"])) for e in extras[:i]]
        expected = Screening(rivals=tuple(earlier)).dominated_by(extra["screened_accuracy"],
                                                                 int(extra["screened_nonzero"]))
        assert extra["screened_dominated"] == expected  # the driver passed every earlier trial's result
        assert (extra["finetune_epochs_spent"] == 2.0) == (expected < 1)
