"""A trial with torch alone, and failed trials inside a real (in-process) search."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from autoprune import model_files, quantize
from autoprune.config import load_config
from autoprune.model_files import load_model
from autoprune.plan import LayerPlan, Plan
from autoprune.search import run_search


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


def test_trial_model_files_reload(tiny_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files a search writes for a trial reload to the very model the trial measured: the same
    outputs, the same zeros and the sparsity the trial reported."""
    measured: list[nn.Module] = []
    save = model_files.save_model

    def keep_a_copy(model: nn.Module, directory):
        measured.append(copy.deepcopy(model).eval())
        return save(model, directory)

    monkeypatch.setattr(model_files, "save_model", keep_a_copy)
    config = load_config(tiny_project, ["execution.backend=in_process", "study.n_trials=1",
                                        "model.pretrain.epochs=1", "space.methods=[l1_unstructured]",
                                        "space.sparsity={low: 0.5, high: 0.8}"])
    run_search(config)
    (trial,) = optuna.load_study(study_name="tiny", storage=config.storage_url).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and measured
    model, pruned = load_model(config.trial_path(trial.number)).eval(), measured[-1]  # (the dense one is first)

    inputs = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), pruned(inputs), rtol=0, atol=0)
    loaded, expected = model.state_dict(), pruned.state_dict()
    assert loaded.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(loaded[k], expected[k])] == []

    params, nonzero = quantize.parameter_counts(model)
    assert (params, nonzero) == (trial.user_attrs["params"], trial.user_attrs["nonzero_params"])
    assert trial.user_attrs["param_sparsity"] == pytest.approx(1 - nonzero / params)  # shapes kept: params = dense
    for name in ("conv1", "conv2"):  # every unit at >= 0.5 sparsity (space.sparsity.low), zeros held
        weight = model.get_submodule(name).weight
        assert int((weight == 0).sum()) >= round(0.5 * weight.numel()), name
