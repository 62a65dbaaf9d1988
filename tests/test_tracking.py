"""MLflow bookkeeping on a real SQLite store: Pareto tags follow the front, no duplicate runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from autoprune.plan import LayerPlan, Plan, TrialResult
from autoprune.tracking import SEMI_STRUCTURED_FILE, SEMI_STRUCTURED_TAG, Tracker, flatten, semi_structured_summary


def result(accuracy: float, size: int, latency: float) -> TrialResult:
    return TrialResult(accuracy=accuracy, accuracy_drop=0.9 - accuracy, params=100, nonzero_params=50, macs=10,
                       size_bytes=size, latency_ms=latency, latency_raw_ms=latency, latency_ratio=1.0,
                       param_sparsity=0.5, train_seconds=0.1)


@pytest.fixture
def tracker(tmp_path: Path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", artifact_location=(tmp_path / "a").as_uri())


def tags(tracker: Tracker, number: int) -> dict[str, str]:
    return tracker.client.get_run(tracker.trial_run(number)).data.tags


def test_pareto_tag_follows_the_front(tracker: Tracker) -> None:
    parent = tracker.start_parent("s", {"study": {"name": "s"}}, {"accuracy": 0.9})
    plan = Plan((LayerPlan("conv1", "l1_unstructured", 0.5),))
    for number in range(3):
        tracker.log_trial(parent, "s", number, plan, result(0.8, 100, 1.0), None)
    assert tracker.tag_pareto({0: 0, 1: 0, 2: 1}) == [0, 1, 2]
    assert tags(tracker, 0)["pareto"] == "true" and tags(tracker, 2)["pareto"] == "false"
    assert tags(tracker, 2)["pareto_rank"] == "1"
    # trial 0 is dominated by a newcomer: it loses its tag, the others are untouched
    tracker.log_trial(parent, "s", 3, plan, result(0.85, 90, 0.9), None)
    assert tracker.tag_pareto({0: 1, 1: 0, 2: 1, 3: 0}) == [0, 3]
    assert tags(tracker, 0)["pareto"] == "false" and tags(tracker, 3)["pareto"] == "true"
    assert tags(tracker, 0)["pareto_rank"] == "1"


def test_resume_reuses_parent_and_skips_logged_trials(tracker: Tracker, tmp_path: Path) -> None:
    parent = tracker.start_parent("s", {"a": 1}, {"accuracy": 0.9})
    plan = Plan(())
    first = tracker.log_trial(parent, "s", 0, plan, None, "boom")
    again = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp")
    assert again.start_parent("s", {"a": 1}, {"accuracy": 0.9}) == parent
    assert again.has_trial(0)
    assert again.log_trial(parent, "s", 0, plan, None, "boom") == first
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(first)
    assert run.info.status == "FAILED" and run.data.tags["fail_reason"] == "boom"
    runs = client.search_runs([again.experiment_id])
    assert len(runs) == 2  # one parent, one trial


def test_semi_structured_layers_are_tagged_and_kept_whole(tracker: Tracker, tmp_path: Path) -> None:
    parent = tracker.start_parent("s", {"a": 1}, {"accuracy": 0.9})
    layers = {"blocks.0.fc1": "2:4", "blocks.0.fc2": "2:4", "blocks.1.fc1": "4:8"}
    plan = Plan(tuple(LayerPlan(name, f"wanda_{pattern}", 0.5) for name, pattern in layers.items()))
    tracker.log_trial(parent, "s", 0, plan, result(0.8, 100, 1.0), None, semi_structured=layers)
    tracker.log_trial(parent, "s", 1, Plan(()), result(0.9, 200, 2.0), None)
    assert tags(tracker, 0)[SEMI_STRUCTURED_TAG] == "2:4 on 2 layers, 4:8 on 1 layer"
    assert SEMI_STRUCTURED_TAG not in tags(tracker, 1)  # no N:M layer: no tag, no file
    saved = tracker.client.download_artifacts(tracker.trial_run(0), SEMI_STRUCTURED_FILE, str(tmp_path))
    assert json.loads(Path(saved).read_text()) == layers
    assert SEMI_STRUCTURED_FILE not in {f.path for f in tracker.client.list_artifacts(tracker.trial_run(1))}
    assert semi_structured_summary({}) == ""


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": "x"}, "d": [1, 2], "e": {}}) == {"a.b": "1", "a.c": "x", "d": "[1, 2]",
                                                                        "e": "{}"}
