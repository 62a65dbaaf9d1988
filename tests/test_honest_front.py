"""Constraints (infeasible trials are never on the front) and honest accuracy (a test split reported beside
the validation accuracy the front is selected on; drops against the dense model fine-tuned as long)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from autoprune import charts, pareto
from autoprune.config import load_config
from autoprune.inputs import build_inputs, fingerprint
from autoprune.plan import LayerPlan, Plan, TrialResult
from autoprune.study import DIRECTIONS, constraint_values, tell_success
from autoprune.trial import DenseBaseline, measure_dense, measure_finetuned_dense, run_trial

DENSE = DenseBaseline(accuracy=0.9, latency_ms=1.0, size_bytes=1000, params=100, macs=1000,
                      finetuned_accuracy=0.92)
LIMITS = {"max_accuracy_drop": 0.05, "max_size_fraction": None, "max_latency_fraction": 0.9}


def _result(accuracy: float, size: int, latency: float) -> TrialResult:
    return TrialResult(accuracy=accuracy, accuracy_drop=DENSE.reference_accuracy - accuracy, params=100,
                       nonzero_params=50, macs=500, size_bytes=size, latency_ms=latency, latency_raw_ms=latency,
                       latency_ratio=latency, param_sparsity=0.5, train_seconds=0.1)


def _tell(study: optuna.Study, result: TrialResult) -> None:
    trial = study.ask()
    trial.suggest_float("a/sparsity", 0.0, 0.9)
    assert tell_success(study, trial, result, constraints=constraint_values(result, DENSE.size_bytes,
                                                                            DENSE.latency_ms, LIMITS))


def test_an_infeasible_trial_is_never_on_the_front() -> None:
    study = optuna.create_study(directions=list(DIRECTIONS))
    _tell(study, _result(0.80, 300, 0.3))   # 0: drop 0.12 > 0.05: infeasible, though it dominates trial 1
    _tell(study, _result(0.89, 500, 0.5))   # 1: drop 0.03, latency 0.5: feasible
    _tell(study, _result(0.91, 600, 0.95))  # 2: latency 0.95 of dense > 0.9: infeasible, most accurate
    trials = pareto.complete_trials(study)
    assert trials[0].constraints == {"accuracy_drop": pytest.approx(0.07), "latency_fraction": pytest.approx(-0.6)}
    assert [t.number for t in study.best_trials] == [1]  # Optuna's own front
    ranks = pareto.ranks(trials)
    assert ranks[1] == 0 and ranks[0] >= 1 and ranks[2] >= 1  # autoprune's ranks agree
    assert [r["trial"] for r in pareto.front_rows(trials)] == [1]
    assert pareto.hypervolume(trials, 1000, 1.0) == pytest.approx(0.89 * 0.5 * 0.5)  # the feasible trial only
    assert [pareto.feasible(t) for t in trials] == [False, True, False]
    # no feasible trial at all: still nobody on the front
    lone = optuna.create_study(directions=list(DIRECTIONS))
    _tell(lone, _result(0.5, 100, 0.1))
    assert lone.best_trials == [] and pareto.ranks(pareto.complete_trials(lone)) == {0: 1}
    # the summary's budget tables leave infeasible trials out too
    points = [charts.Point(t.number, t.values[0], int(t.values[1]), t.values[2], rank=ranks[t.number],
                           feasible=pareto.feasible(t)) for t in trials]
    assert charts.best_within(points).trial == 1
    text = charts.summary_markdown("s", points, DENSE, failed=0, hypervolume=0.1)
    assert "2 complete trial(s) are infeasible" in text
    assert charts.NO_TEST_SPLIT in text  # no test split given: said so
    assert "fine-tuned with the trials' budget (nothing pruned): accuracy 0.9200" in text


THREE_LOADERS = '''
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
from tinymod import make_loaders


def make_three(n=400):
    train, val = make_loaders(n)
    d = load_digits()
    x = torch.tensor(d.images[n:n + 200], dtype=torch.float32).unsqueeze(1) / 16
    return train, val, DataLoader(TensorDataset(x, torch.tensor(d.target[n:n + 200])), batch_size=100)
'''


def test_test_split_is_wired_and_drops_use_the_finetuned_dense(tiny_project: Path, tiny_setup,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tiny_project.parent / "tinythree.py").write_text(THREE_LOADERS)  # a data factory with a test split
    monkeypatch.setitem(sys.modules, "tinythree", None)  # forgotten after the test
    del sys.modules["tinythree"]
    inputs = build_inputs(load_config(tiny_project, ["data.factory=tinythree:make_three"]))
    assert inputs.test_loader is not None and inputs.settings.test_loader is inputs.test_loader
    assert "test_batches" in fingerprint(inputs)

    setup = tiny_setup(epochs=1)
    settings = replace(setup.settings, test_loader=inputs.test_loader)
    dense = measure_dense(setup.dense, setup.val_loader, settings, min_run_time=0.02)
    dense = measure_finetuned_dense(setup.dense, setup.train_loader, setup.val_loader, settings, dense)
    assert dense.test_accuracy is not None and dense.finetuned_test_accuracy is not None
    assert dense.finetuned_accuracy > dense.accuracy  # an untrained dense model gains from the trials' budget
    assert dense.reference_accuracy == dense.finetuned_accuracy
    output = run_trial(setup.dense, setup.train_loader, setup.val_loader,
                       Plan((LayerPlan("conv2", "l1_unstructured", 0.5),)), settings, dense)
    result = output.result
    assert 0 <= result.extra["test_accuracy"] <= 1 and "test_accuracy" in result.as_metrics()  # recorded, no objective
    assert result.accuracy_drop == pytest.approx(dense.finetuned_accuracy - result.accuracy)

    study = optuna.create_study(directions=list(DIRECTIONS))
    trial = study.ask()
    tell_success(study, trial, result)
    (row,) = pareto.front_rows(pareto.complete_trials(study))
    assert row["test_accuracy"] == result.extra["test_accuracy"]  # front table, CSV and JSON
    point = charts.Point(0, result.accuracy, result.size_bytes, result.latency_ms, rank=0,
                         test_accuracy=result.extra["test_accuracy"])
    text = charts.summary_markdown("s", [point], dense, failed=0, hypervolume=0.1)
    assert charts.NO_TEST_SPLIT not in text and "| test accuracy |" in text
    assert f"test accuracy {point.test_accuracy:.4f}" in charts.figure([point], dense, "t").data[0].hovertext[0]
