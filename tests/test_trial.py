"""A trial with torch alone, and failed trials inside a real (in-process) search."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import Logits, tiny_decoder

import autoprune
from autoprune import model_files, quantize
from autoprune.config import load_config
from autoprune.model_files import load_model
from autoprune.plan import LayerPlan, Plan
from autoprune.search import run_search
from autoprune.study import SEMI_STRUCTURED_ATTR
from autoprune.tracking import SEMI_STRUCTURED_FILE, SEMI_STRUCTURED_TAG, TRIAL_TAG


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
    assert output.semi_structured == {}  # no N:M method: no pattern


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



def test_semi_structured_pattern_reaches_the_study_and_mlflow(tmp_path: Path, one_thread: None) -> None:
    """A 2:4 trial hands back ``{layer: "2:4"}`` for every layer it pruned; the search stores it with the
    Optuna trial and logs it to the trial's MLflow run (real SQLite store): a short tag and the full mapping."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (24, 16), generator=torch.Generator().manual_seed(1))
    config = {"study": {"name": "nm", "n_trials": 1, "sampler": "random", "baselines": []},
              "work_dir": str(tmp_path / "work"), "model": {"task": "causal_lm"},
              "space": {"methods": ["wanda_2:4"], "sparsity": {"low": 0.5, "high": 0.5}},
              "finetune": {"epochs": 0}, "latency": {"rounds": 1, "min_run_time": 0.005},
              "execution": {"backend": "in_process"}, "tracking": {"log_models": False}}
    search = autoprune.Search(config, model=Logits(tiny_decoder("llama", layers=1)),
                              train_data=TensorDataset(ids[:16]),
                              val_data=DataLoader(TensorDataset(ids[16:]), batch_size=4))
    assert search.run().completed == 1
    (trial,) = search.study.trials
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    expected = {f"lm.model.layers.0.{name}": "2:4" for name in projections}
    assert trial.user_attrs[SEMI_STRUCTURED_ATTR] == expected
    # Search.evaluate scores with the task's metric: the validation perplexity again, from ids alone
    assert search.evaluate(0, TensorDataset(ids[16:])) == pytest.approx(trial.values[0], rel=1e-5)

    client = MlflowClient(search.config.tracking_uri)
    experiment = client.get_experiment_by_name(search.config.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '0'")
    assert run.data.tags[SEMI_STRUCTURED_TAG] == "2:4 on 7 layers"
    mapping = Path(client.download_artifacts(run.info.run_id, SEMI_STRUCTURED_FILE, str(tmp_path)))
    assert json.loads(mapping.read_text()) == expected
