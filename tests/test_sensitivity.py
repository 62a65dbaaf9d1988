"""Sensitivity analysis on the tiny CNN: curves without fine-tuning, bounds, MLflow artifacts, the CLI,
and a new study seeded from sensitivity.json."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
from conftest import TINY_CONFIG, TINY_MODULE
from mlflow import MlflowClient
from torch.utils.data import DataLoader, TensorDataset
from zoo import ZOO, Logits, tiny_decoder

from autoprune.config import config_from_mapping, load_config
from autoprune.errors import ConfigError
from autoprune.live import Live
from autoprune.methods import PruneContext
from autoprune.search import run_search
from autoprune.sensitivity import (
    SENSITIVITY_ATTR,
    SENSITIVITY_FILE,
    Point,
    figure,
    measure_curves,
    parse_ratios,
    quality_drop,
    read_bounds,
    run_sensitivity,
    seed_params,
    seed_trials,
    tolerated,
    unit_bounds,
    unit_highs,
)
from autoprune.space import QUANTIZE_PARAM, SearchSpace, Unit
from autoprune.workspace import Workspace

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sensitivity")
    (root / "tinymod.py").write_text(TINY_MODULE)
    config = root / "search.yaml"
    config.write_text(textwrap.dedent(TINY_CONFIG))
    return config


@pytest.fixture(scope="module")
def analysed(project: Path):
    """One analysis of the tiny project (pre-trains the dense model once, for every test here)."""
    config = load_config(project)
    progress = []
    result = run_sensitivity(config, on_progress=progress.append)
    return config, result, progress


def test_curves_start_at_dense_accuracy_and_fall(analysed) -> None:
    config, result, progress = analysed
    data = json.loads((config.work_path / SENSITIVITY_FILE).read_text())
    assert data["dense_accuracy"] == result.dense_accuracy > 0.5  # the pre-trained CNN learned something
    assert data["ratios"] == [0.0, 0.25, 0.5, 0.75, 0.9] and data["fine_tuned"] is False
    # one curve per unit of the space and method that can prune it, each over every ratio
    assert sorted((c["unit"], c["method"]) for c in data["curves"]) == sorted(
        (u, m) for u in ("conv1", "conv2") for m in ("l1_unstructured", "l1_structured"))
    for curve in data["curves"]:
        points = curve["points"]
        assert [p["ratio"] for p in points] == data["ratios"]
        assert all(p["error"] is None for p in points)
        assert points[0]["accuracy"] == data["dense_accuracy"]  # the method at ratio 0 changes nothing
        assert points[0]["drop"] == 0 and points[0]["param_sparsity"] == 0
        assert points[-1]["param_sparsity"] > points[1]["param_sparsity"] > 0
    at_90 = {(c["unit"], c["method"]): c["points"][-1]["accuracy"] for c in data["curves"]}
    assert min(at_90.values()) < data["dense_accuracy"]  # the most sensitive unit suffers at 0.9
    mean = [sum(c["points"][i]["accuracy"] for c in data["curves"]) / 4 for i in range(5)]
    assert mean[-1] < mean[1]  # on average accuracy falls with sparsity
    # bounds: the largest ratio reached from 0 with every drop <= max_drop; the unit's best method
    for curve in data["curves"]:
        drops = [p["drop"] for p in curve["points"]]
        ok = [r for r, d in zip(data["ratios"], drops, strict=True) if d <= data["max_drop"] + 1e-12]
        assert curve["bound"] in ok
        following = data["ratios"].index(curve["bound"]) + 1
        assert following == len(drops) or drops[following] > data["max_drop"]
    for unit in ("conv1", "conv2"):
        bound = data["bounds"][unit]
        assert bound["sparsity"] == max(bound["by_method"].values()) == bound["by_method"][bound["method"]]
    assert progress[-1].done == progress[-1].total == 1 + 4 * 5


def test_mlflow_parent_run_has_plot_and_json(analysed, tmp_path: Path) -> None:
    config, result, _ = analysed
    client = MlflowClient(config.tracking_uri)
    run = client.get_run(result.parent_run_id)
    assert run.data.tags["autoprune.study"] == "tiny" and run.data.tags["autoprune.role"] == "study"
    assert run.data.metrics["dense_accuracy"] == pytest.approx(result.dense_accuracy)
    paths = {a.path for a in client.list_artifacts(result.parent_run_id, "sensitivity")}
    assert paths == {"sensitivity/sensitivity.png", "sensitivity/sensitivity.json"}
    png = Path(client.download_artifacts(result.parent_run_id, "sensitivity/sensitivity.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    logged = json.loads(Path(client.download_artifacts(result.parent_run_id, "sensitivity/sensitivity.json",
                                                       str(tmp_path))).read_text())
    assert logged["bounds"] == result.bounds and len(logged["curves"]) == 4


def test_new_study_evaluates_the_seeded_trials_first(analysed) -> None:
    config, result, _ = analysed
    assert not result.study_exists and len(result.seeds) == 2
    search = load_config(config.base_dir / "search.yaml", ["execution.backend=in_process", "study.n_trials=2"])
    summary = run_search(search)
    assert summary.parent_run_id == result.parent_run_id  # the search goes on in the same parent run
    study = optuna.load_study(study_name="tiny", storage=search.storage_url)
    trials = sorted(study.trials, key=lambda t: t.number)
    low, high = search.space.sparsity.low, search.space.sparsity.high
    for trial, scale in zip(trials, (1.0, 0.5), strict=True):
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.user_attrs["autoprune.baseline"].startswith("sensitivity")
        for unit in ("conv1", "conv2"):
            bound = result.bounds[unit]
            assert trial.params[f"{unit}/method"] == bound["method"]
            assert trial.params[f"{unit}/sparsity"] == pytest.approx(min(max(bound["sparsity"] * scale, low), high))
    assert trials[0].params == result.seeds[0][1]
    assert study.user_attrs[SENSITIVITY_ATTR] == [label for label, _ in result.seeds]
    assert study.user_attrs["autoprune.dense"]["accuracy"] == result.dense_accuracy  # same dense model


def test_bounds_cap_each_units_range_and_survive_resume(analysed) -> None:
    config, result, _ = analysed
    overrides = ["execution.backend=in_process", "study.n_trials=3", "study.name=tiny-bounded",
                 "space.sensitivity_bounds=true", "space.sensitivity_margin=0.05"]
    search = load_config(config.base_dir / "search.yaml", overrides)
    run_search(search)
    study = optuna.load_study(study_name="tiny-bounded", storage=search.storage_url)
    expected = {unit: entry["sparsity"] + 0.05 for unit, entry in result.bounds.items()}
    assert study.user_attrs["autoprune.unit_high"] == pytest.approx(expected)
    high = search.space.sparsity.high
    sampled = [t for t in study.trials if "autoprune.baseline" not in t.user_attrs]
    assert sampled
    for trial in sampled:
        for unit in ("conv1", "conv2"):
            distribution = trial.distributions[f"{unit}/sparsity"]
            assert distribution.high == pytest.approx(min(expected[unit], high))
            assert trial.params[f"{unit}/sparsity"] <= distribution.high
    # resume keeps the stored caps even without the switch
    resumed = load_config(config.base_dir / "search.yaml",
                          [*overrides[:1], "study.n_trials=4", "study.name=tiny-bounded"])
    run_search(resumed, resume=True)
    trials = optuna.load_study(study_name="tiny-bounded", storage=search.storage_url).trials
    last = max(trials, key=lambda t: t.number)
    assert last.distributions["conv1/sparsity"].high == pytest.approx(min(expected["conv1"], high))


def test_bounds_without_an_analysis_are_a_config_error(tiny_project: Path) -> None:
    config = load_config(tiny_project, ["execution.backend=in_process", "space.sensitivity_bounds=true"])
    with pytest.raises(ConfigError, match=r"field 'space.sensitivity_bounds': cannot read .*sensitivity.json"):
        run_search(config)
    assert not (config.work_path / "optuna.db").exists() or not optuna.get_all_study_names(config.storage_url)


def test_seeds_need_the_same_model_config(analysed, caplog: pytest.LogCaptureFixture) -> None:
    config, result, _ = analysed
    space = SearchSpace((Unit("conv1", ("l1_unstructured", "l1_structured")),
                         Unit("conv2", ("l1_unstructured", "l1_structured"))), 0.1, 0.8)
    assert seed_trials(config, space) == result.seeds
    other = load_config(config.base_dir / "search.yaml", ["model.kwargs={width: 8}"])
    with caplog.at_level(logging.WARNING, logger="autoprune.sensitivity"):
        assert seed_trials(other, space) == []
    assert "another model/data config" in caplog.text


def test_cli_prints_table_and_next_step(analysed, project: Path) -> None:
    config, _, _ = analysed
    work = project.parent / "cli_work"
    (work / "studies" / "cli").mkdir(parents=True)  # the same dense model, no pre-training
    shutil.copy(config.study_path / "dense.pt", work / "studies" / "cli" / "dense.pt")
    # another study in the same stores (their tables exist already: a faster start)
    stores = ["--set", f"tracking.uri={config.tracking_uri}", "--set", "tracking.experiment=tiny",
              "--set", f"study.storage={config.storage_url}", "--set", "study.name=cli"]
    proc = subprocess.run([str(BIN / "autoprune"), "sensitivity", str(project), "--set", "work_dir=cli_work", *stores,
                           "--ratios", "0.9,0.5", "--method", "l1_structured", "--max-drop", "0.1"],
                          env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bound = largest sparsity with drop <= 0.1" in proc.stdout
    assert "conv2 │ l1_structured" in proc.stdout and "l1_unstructured" not in proc.stdout
    assert f"wrote {work / SENSITIVITY_FILE}" in proc.stdout
    assert "next: 'autoprune run" in proc.stdout and "1. sensitivity bounds (max drop 0.1)" in proc.stdout
    data = json.loads((work / SENSITIVITY_FILE).read_text())
    assert data["ratios"] == [0.0, 0.5, 0.9] and data["methods"] == ["l1_structured"]
    assert len(data["curves"]) == 2


def test_cli_rejects_bad_ratios(project: Path) -> None:
    proc = subprocess.run([str(BIN / "autoprune"), "sensitivity", str(project), "--ratios", "0.5,1.5"],
                          env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Invalid value for '--ratios'" in proc.stderr and "1.5 is outside [0, 1)" in proc.stderr


def test_parse_ratios_and_cap(project: Path) -> None:
    assert parse_ratios("0.9, 0.25,0.5,0.25") == (0.25, 0.5, 0.9)
    for bad in ("", "a", "1", "-0.1", "nan"):
        with pytest.raises(ValueError):
            parse_ratios(bad)
    config = load_config(project, ["space.max_layer_sparsity=0.8"])
    with pytest.raises(ConfigError, match=r"option .--ratios.: 0\.9 exceeds space\.max_layer_sparsity=0\.8"):
        run_sensitivity(config, (0.5, 0.9))


def test_tolerated_stops_at_the_first_drop_too_large() -> None:
    points = [Point(0.0, 0.9, 0.0, 0.0), Point(0.25, 0.9, 0.0, 0.2), Point(0.5, 0.8, 0.1, 0.4),
              Point(0.75, 0.9, 0.0, 0.6), Point(0.9, None, None, None, "boom")]
    assert tolerated(points, 0.05) == 0.25  # 0.75 recovers, but 0.5 broke the run
    assert tolerated(points, 0.1) == 0.75  # a failed point counts as too large a drop
    assert tolerated(points[2:3], 0.05) == 0.0


def test_seed_params_fit_the_space() -> None:
    space = SearchSpace((Unit("a", ("l1_unstructured", "l1_structured")), Unit("b", ("l1_structured",)),
                         Unit("c", ("l1_unstructured",)), Unit("blk", ("remove_block",), removal=True)),
                        low=0.1, high=0.8, step=0.05, quantize="search")
    bounds = {"a": {"method": "l1_unstructured", "sparsity": 0.9,
                    "by_method": {"l1_unstructured": 0.9, "l1_structured": 0.5}},
              "b": {"method": "random_structured", "sparsity": 0.75,  # a method the space no longer has
                    "by_method": {"random_structured": 0.75, "l1_structured": 0.33}},
              "blk": {"remove": True, "method": "remove_block"}}
    (label, first), (_, second) = seed_params(space, bounds, 0.05)
    assert label == "sensitivity bounds (max drop 0.05)"
    assert first == {"a/method": "l1_unstructured", "a/sparsity": 0.8,  # clipped to high
                     "b/sparsity": 0.3,  # rounded down to the step
                     "c/sparsity": 0.1,  # no bound: the space's low
                     "blk/remove": True, QUANTIZE_PARAM: False}
    assert second == {"a/method": "l1_unstructured", "a/sparsity": 0.45, "b/sparsity": 0.15, "c/sparsity": 0.1,
                      "blk/remove": False, QUANTIZE_PARAM: False}
    distributions = space.distributions()
    for params in (first, second):
        assert set(params) == set(distributions)
        for name, value in params.items():
            assert distributions[name]._contains(distributions[name].to_internal_repr(value))
    assert len(seed_params(space, {}, 0.05)) == 1  # bound and half bound coincide: given once


def test_removal_and_structured_curves_on_a_resnet() -> None:
    torch.manual_seed(0)
    entry = ZOO["resnet"]
    model = entry.build()
    context = PruneContext(example_inputs=entry.example(1), protected=frozenset({entry.head}))
    space = SearchSpace.from_model(model, context, ["l1_structured", "remove_block"], ["layer1.*"], low=0.0,
                                   high=0.9)
    gen = torch.Generator().manual_seed(0)
    val = [(entry.example(16), torch.randint(0, 10, (16,), generator=gen))]
    dense, curves = measure_curves(model, space, context, val, (0.5,))
    removal = [c for c in curves if c.family == "removal"]
    assert {c.unit for c in removal} == {"layer1.0", "layer1.1"}
    assert all([p.ratio for p in c.points] == [0.0, 1.0] for c in removal)
    assert all(c.points[0].accuracy == dense for c in curves)
    bounds = unit_bounds(space, curves, 0.99)
    assert bounds["layer1.0"] == {"remove": True, "method": "remove_block"}
    assert all(b["sparsity"] == 0.5 for b in bounds.values() if "sparsity" in b)
    assert seed_params(space, bounds)[0][1]["layer1.0/remove"] is True


def test_quality_drop_is_in_the_metrics_own_direction() -> None:
    assert quality_drop(0.9, 0.85) == pytest.approx(0.05)  # accuracy points lost
    assert quality_drop(2.0, 2.2, "perplexity") == pytest.approx(0.1)  # 10 % higher perplexity
    assert quality_drop(2.0, 1.9, "perplexity") == pytest.approx(-0.05)  # better than dense
    with pytest.raises(ValueError, match=r"metric: expected one of accuracy, perplexity, got 'bleu'"):
        quality_drop(1.0, 1.0, "bleu")



def test_causal_lm_curves_are_of_perplexity_and_bounds_of_its_relative_increase(tmp_path: Path,
                                                                                 one_thread: None) -> None:
    """``model.task: causal_lm``: perplexity per unit (lower is better), the drop its relative increase; a unit
    pruned harder has a higher perplexity, and bounds, caps and the plot mean what they mean for accuracy."""
    pytest.importorskip("transformers")
    pairs = torch.randint(1, 16, (256, 2), generator=torch.Generator().manual_seed(1))
    ids = pairs.repeat(1, 8)  # a b a b ...: after the first pair, the next token is the one two back
    raw = {"study": {"name": "lm", "seed": 0}, "work_dir": str(tmp_path / "work"),
           "model": {"task": "causal_lm", "pretrain": {"epochs": 15, "lr": 0.02}},
           "space": {"methods": ["attention_heads", "mlp_neurons"]}, "execution": {"backend": "in_process"}}
    config = config_from_mapping(raw, tmp_path)
    workspace = Workspace(config, Live(Logits(tiny_decoder("llama", layers=1)), TensorDataset(ids[:240]),
                                       DataLoader(TensorDataset(ids[240:]), batch_size=8)))
    result = run_sensitivity(workspace, (0.25, 0.5, 0.9), max_drop=0.1, log_mlflow=False)
    data = json.loads(result.path.read_text())
    assert data["metric"] == result.metric == "perplexity"
    dense = data["dense_accuracy"]
    assert 1.0 < dense < 3.0  # learned: far below the 15 equally likely tokens of a pair's unseen start
    curves = {curve["method"]: curve for curve in data["curves"]}
    assert curves.keys() == {"attention_heads", "mlp_neurons"}
    for curve in curves.values():
        points = curve["points"]
        assert [p["ratio"] for p in points] == [0.0, 0.25, 0.5, 0.9] and points[0]["accuracy"] == dense
        for p in points:  # the drop is the relative perplexity increase: positive when perplexity rises
            assert p["drop"] == pytest.approx(p["accuracy"] / dense - 1)
        perplexities = [p["accuracy"] for p in points]  # pruned harder: a higher perplexity, every step
        assert all(a < b for a, b in itertools.pairwise(perplexities)), perplexities
        drops = [p["drop"] for p in points]
        bound = curve["bound"]  # the largest ratio reached from 0 with every increase <= 10 %
        assert bound < 0.9 and all(d <= 0.1 for d, p in zip(drops, points, strict=True) if p["ratio"] <= bound)
        assert drops[data["ratios"].index(bound) + 1] > 0.1

    space = workspace.inputs.space
    bounds, max_drop = read_bounds(config, space)  # what space.sensitivity_bounds caps a new study with
    assert max_drop == 0.1 and bounds == result.bounds
    assert unit_highs(bounds, 0.05) == pytest.approx({c["unit"]: c["bound"] + 0.05 for c in curves.values()})
    assert seed_params(space, bounds, max_drop) == result.seeds
    panel = figure(result).axes[0]
    assert panel.get_yscale() == "log" and panel.get_ylabel() == "validation perplexity"
