"""A trial with torch alone, and failed trials inside a real (in-process) search."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from autoprune.config import load_config
from autoprune.model_files import load_model
from autoprune.plan import LayerPlan, Plan
from autoprune.search import run_search, trial_dir


def test_unstructured_trial_reaches_sparsity_and_shrinks_file(tiny_setup) -> None:
    setup = tiny_setup(epochs=1)
    dense, baseline = setup.dense, setup.baseline
    output = setup.run(Plan((LayerPlan("conv2", "l1_unstructured", 0.8), LayerPlan("conv1", "l1_unstructured", 0.5))))
    result = output.result
    conv1, conv2 = dense.conv1.weight.numel(), dense.conv2.weight.numel()
    expected_zeros = round(0.8 * conv2) + round(0.5 * conv1)
    assert result.params == baseline.params  # unstructured keeps shapes
    assert result.params - result.nonzero_params >= expected_zeros  # masks held through fine-tuning
    assert result.size_bytes < baseline.size_bytes
    assert result.latency_ms > 0 and result.latency_ratio > 0
    assert 0 <= result.accuracy <= 1
    assert result.accuracy_drop == pytest.approx(baseline.accuracy - result.accuracy)
    assert dense.conv2.weight.count_nonzero() == conv2  # the dense model was not touched


def test_structured_trial_shrinks_model(tiny_setup) -> None:
    setup = tiny_setup(epochs=0)
    output = setup.run(Plan((LayerPlan("conv1", "l1_structured", 0.5),)))
    assert output.result.params < setup.baseline.params
    assert output.result.macs < setup.baseline.macs


def test_failing_trials_are_recorded_and_search_goes_on(tiny_project: Path) -> None:
    """Sparsities above the per-layer cap make every trial raise: each becomes FAIL with its reason."""
    config = load_config(tiny_project, [
        "execution.backend=in_process", "study.n_trials=2", "space.methods=[l1_unstructured]",
        "space.max_layer_sparsity=0.3", "space.sparsity={low: 0.5, high: 0.8}", "model.pretrain.epochs=1",
    ])
    summary = run_search(config)
    assert (summary.completed, summary.failed) == (0, 2)
    study = optuna.load_study(study_name="tiny", storage=config.storage_url)
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.FAIL
        assert "exceeds max_layer_sparsity=0.3" in trial.user_attrs["fail_reason"]


def test_trial_model_files_reload(tiny_project: Path) -> None:
    config = load_config(tiny_project, ["execution.backend=in_process", "study.n_trials=1",
                                        "model.pretrain.epochs=1"])
    run_search(config)
    model = load_model(trial_dir(config, 0))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
