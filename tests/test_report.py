"""What a study leaves in MLflow (real SQLite store): Pareto tags as the front moves, the
hypervolume history, the parent run's files, Pareto models that load back; and
``autoprune report`` / ``ui`` / ``dashboard`` on a real study."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow.pytorch
import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState, create_trial
from torch import nn

from autoprune.plan import LayerPlan, Plan, TrialResult
from autoprune.report import (
    CHART_HTML,
    CHART_PNG,
    FRONT_CSV,
    FRONT_JSON,
    FRONT_SIZE,
    HYPERVOLUME,
    SUMMARY_MD,
    ModelSource,
    StudyReport,
)
from autoprune.study import BASELINE_ATTR, DIRECTIONS, REASON_ATTR
from autoprune.tracking import MODEL_TAG, Tracker
from autoprune.trial import DenseBaseline

DENSE = DenseBaseline(accuracy=0.9, latency_ms=1.0, size_bytes=1000, params=100, macs=1000)
PLAN = Plan((LayerPlan("conv", "l1_structured", 0.5), LayerPlan("fc", "l1_unstructured", 0.25)))
T0 = dt.datetime(2026, 1, 1)


class Small(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class Branchy(Small):
    """Data-dependent control flow: torch.export cannot trace it, so it is pickled instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if float(y.sum()) > 0 else -y


EXAMPLE = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)


def result(accuracy: float, size: int, latency: float) -> TrialResult:
    return TrialResult(accuracy=accuracy, accuracy_drop=DENSE.accuracy - accuracy, params=100, nonzero_params=50,
                       macs=10, size_bytes=size, latency_ms=latency, latency_raw_ms=latency, latency_ratio=latency,
                       param_sparsity=0.5, train_seconds=0.1)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow store for this module's tests (creating one takes seconds); an experiment per test."""
    return tmp_path_factory.mktemp("mlflow")


class Harness:
    """A study and its MLflow report, trials finished by hand as the driver would."""

    def __init__(self, store: Path, models: ModelSource | None = None) -> None:
        self.uri = f"sqlite:///{store / 'mlflow.db'}"
        name = f"exp{len(list(store.glob('artifacts-*')))}"
        self.tracker = Tracker(self.uri, name, artifact_location=(store / f"artifacts-{name}").as_uri())
        (store / f"artifacts-{name}").mkdir()
        self.parent = self.tracker.start_parent("s", {"study": {"name": "s"}}, {"accuracy": DENSE.accuracy})
        self.study = optuna.create_study(directions=list(DIRECTIONS))
        self.report = StudyReport(self.tracker, self.parent, "s", DENSE, models=models)
        self.client = MlflowClient(self.uri)

    def finish(self, accuracy: float | None, size: int = 0, latency: float = 0.0, baseline: str | None = None) -> int:
        number = len(self.study.trials)
        when = T0 + dt.timedelta(seconds=number)
        attrs: dict[str, object] = {BASELINE_ATTR: baseline} if baseline else {}
        res = None if accuracy is None else result(accuracy, size, latency)
        if res is None:
            attrs[REASON_ATTR] = "boom"
            trial = create_trial(state=TrialState.FAIL, user_attrs=attrs)
        else:
            trial = create_trial(values=[accuracy, size, latency], user_attrs={**attrs, **res.as_metrics()})
        trial.datetime_start, trial.datetime_complete = when, when
        self.study.add_trial(trial)
        self.report.trial_finished(self.study, number, PLAN, attrs, res, None if res else "boom")
        return number

    def tags(self, number: int) -> dict[str, str]:
        return self.client.get_run(self.tracker.trial_run(number)).data.tags

    def history(self, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.parent, key))

    def artifact(self, name: str) -> bytes:
        path = self.client.download_artifacts(self.parent, name)
        return Path(path).read_bytes()


def test_pareto_tags_follow_the_front_and_only_changes_are_written(store: Path) -> None:
    h = Harness(store)
    h.finish(0.80, 500, 0.5)
    assert h.tags(0)["pareto"] == "true" and h.tags(0)["pareto_rank"] == "0"
    h.finish(0.70, 800, 0.8)  # dominated by 0
    assert h.tags(1)["pareto"] == "false" and h.tags(1)["pareto_rank"] == "1"

    writes: list[tuple[str, str, str]] = []
    set_tag = h.tracker.client.set_tag
    h.tracker.client.set_tag = lambda run, key, value: (writes.append((run, key, value)), set_tag(run, key, value))
    h.finish(0.60, 900, 0.9)  # dominated by both: only its own tags are written
    assert {(key, value) for run, key, value in writes if run != h.tracker.trial_run(2)} == set()
    assert h.tags(2)["pareto_rank"] == "2"

    writes.clear()
    h.finish(0.85, 400, 0.4)  # dominates 0: 0 leaves the front, 1 and 2 move down a rank
    assert h.tags(3)["pareto"] == "true"
    assert h.tags(0)["pareto"] == "false" and h.tags(0)["pareto_rank"] == "1"
    assert h.tags(1)["pareto_rank"] == "2" and h.tags(2)["pareto_rank"] == "3"
    assert h.tags(1)["pareto"] == "false"
    changed_pareto = {run for run, key, _ in writes if key == "pareto"}
    assert changed_pareto == {h.tracker.trial_run(0), h.tracker.trial_run(3)}  # 1 and 2 stayed 'false'
    assert {(key, value) for run, key, value in writes if run == h.parent} == set()  # no tag churn on the parent


def test_hypervolume_history_has_one_point_per_finished_trial(store: Path) -> None:
    h = Harness(store)
    h.finish(0.5, 500, 0.5)
    h.finish(None)  # a failed trial is a step too: the curve stays flat
    h.finish(0.8, 400, 0.4)
    h.finish(0.1, 900, 0.9)
    hv = h.history(HYPERVOLUME)
    assert [step for step, _ in hv] == [1, 2, 3, 4]
    assert hv[0][1] == pytest.approx(0.125) and hv[1][1] == hv[0][1]
    assert hv[2][1] == pytest.approx(0.8 * 0.6 * 0.6) and hv[3][1] == hv[2][1]
    assert h.history(FRONT_SIZE) == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0)]
    # finalize (and a resumed driver) fill only missing steps: no duplicates
    h.report.finalize(h.study)
    again = StudyReport(h.tracker, h.parent, "s", DENSE)
    again.log_missing(h.study, space=None)  # type: ignore[arg-type]
    assert [step for step, _ in h.history(HYPERVOLUME)] == [1, 2, 3, 4]


def test_finalize_writes_the_front_files(store: Path) -> None:
    h = Harness(store)
    h.finish(0.85, 900, 0.9, baseline="uniform l1_unstructured 0.1")  # 0: front (most accurate)
    h.finish(0.80, 500, 0.5)  # 1: front
    h.finish(0.70, 800, 0.8, baseline="uniform l1_unstructured 0.5")  # 2: dominated by 1
    h.finish(None)  # 3: failed
    h.finish(0.60, 300, 0.7)  # 4: front (smallest)
    rows = h.report.finalize(h.study)
    assert [r["trial"] for r in rows] == [4, 1, 0]
    names = {a.path for a in h.client.list_artifacts(h.parent)}
    assert {FRONT_CSV, FRONT_JSON, CHART_HTML, CHART_PNG, SUMMARY_MD} <= names

    table = list(csv.DictReader(io.StringIO(h.artifact(FRONT_CSV).decode())))
    assert [int(r["trial"]) for r in table] == [4, 1, 0]
    assert table[2]["baseline"] == "uniform l1_unstructured 0.1"
    assert table[0]["plan"] == "conv l1_structured 0.50, fc l1_unstructured 0.25"
    document = json.loads(h.artifact(FRONT_JSON))
    assert len(document["front"]) == 3 and document["failed_trials"] == 1 and document["complete_trials"] == 4
    assert [b["trial"] for b in document["baselines"]] == [0, 2]
    assert [b["on_front"] for b in document["baselines"]] == [True, False]
    assert document["dense"]["size_bytes"] == DENSE.size_bytes

    html = h.artifact(CHART_HTML).decode()
    assert len(html) > 3_000_000 and '"uid":"front-3d"' in html.replace(" ", "")
    assert h.artifact(CHART_PNG)[:4] == b"\x89PNG"
    summary = h.artifact(SUMMARY_MD).decode()
    assert "4 complete trials, 1 failed; **3 on the Pareto front**" in summary
    assert "| uniform l1_unstructured 0.5 | 2 |" in summary
    parent = h.client.get_run(h.parent)
    assert parent.data.tags["mlflow.note.content"] == summary  # the run's description in the UI
    assert parent.data.metrics["completed_trials"] == 4 and parent.data.metrics["failed_trials"] == 1
    assert parent.data.metrics[HYPERVOLUME] == pytest.approx(document["hypervolume"])  # the last point


def test_pareto_models_load_back_with_mlflow_and_match(store: Path) -> None:
    models = {n: Small(seed=n).eval() for n in range(3)}
    h = Harness(store, ModelSource(lambda n: models[n], EXAMPLE))
    h.finish(0.80, 500, 0.5)
    h.finish(0.70, 800, 0.8)  # dominated: no model
    h.finish(0.85, 900, 0.9)
    h.report.finalize(h.study)
    assert h.report.models_logged == [0, 2] and h.report.model_errors == {}
    assert h.tracker.model_id(1) is None
    x = torch.from_numpy(np.random.default_rng(1).random((5, 1, 8, 8), dtype=np.float32))
    for number in (0, 2):
        model_id = h.tags(number)[MODEL_TAG]
        uri = h.tracker.model_uri(number)
        loaded = mlflow.pytorch.load_model(uri)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), models[number](x))  # batch size 5: the batch dim stays dynamic
        logged = h.client.get_logged_model(model_id)
        assert logged.source_run_id == h.tracker.trial_run(number)
        assert logged.tags["serialization_format"] == "pt2"
        local = Path(uri.removeprefix("file://"))
        info = mlflow.models.Model.load(local)
        assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]
        assert (local / "input_example.json").is_file()
    # a trial that later leaves the front keeps its model; a second finalize logs nothing twice
    h.finish(0.90, 400, 0.4)
    models[3] = Small(seed=3).eval()
    h.report.finalize(h.study)
    assert h.tags(0)["pareto"] == "false" and h.tags(0)[MODEL_TAG]
    assert h.report.models_logged == [0, 2, 3]
    assert len(h.client.search_logged_models([h.tracker.experiment_id])) == 3


def test_a_model_torch_export_cannot_trace_is_pickled(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Branchy(seed=0).eval()
    h = Harness(store, ModelSource(lambda n: model, EXAMPLE))
    h.finish(0.8, 500, 0.5)
    h.report.finalize(h.study)
    assert h.report.model_errors == {}
    logged = h.client.get_logged_model(h.tracker.model_id(0))
    assert logged.tags["serialization_format"] == "pickle"
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    loaded = mlflow.pytorch.load_model(h.tracker.model_uri(0))
    x = torch.from_numpy(EXAMPLE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_model_that_cannot_be_loaded_is_reported_not_raised(store: Path) -> None:
    def load(number: int) -> nn.Module:
        raise FileNotFoundError(f"no files for trial {number}")

    h = Harness(store, ModelSource(load, EXAMPLE))
    h.finish(0.8, 500, 0.5)
    rows = h.report.finalize(h.study)
    assert [r["trial"] for r in rows] == [0]
    assert h.report.model_errors == {0: "FileNotFoundError: no files for trial 0"}
    assert CHART_HTML in {a.path for a in h.client.list_artifacts(h.parent)}


# ---- the commands, on a real (in-process) study ----
BIN = Path(sys.executable).parent


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250"}
    proc = subprocess.run([str(BIN / "autoprune"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"autoprune {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_report_ui_and_dashboard_commands(tiny_project: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprune.config import load_config
    from autoprune.search import run_search

    overrides = ["execution.backend=in_process", "study.baselines=[0.5]"]
    config = load_config(tiny_project, overrides)
    summary = run_search(config)
    front = {row["trial"] for row in summary.front}

    def children(client: MlflowClient) -> dict[int, dict[str, str]]:
        exp = client.get_experiment_by_name("tiny")
        return {int(r.data.tags["autoprune.trial"]): r.data.tags for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("autoprune.role") == "trial"}

    tags = children(MlflowClient(config.tracking_uri))
    assert {n for n, t in tags.items() if t["pareto"] == "true"} == front
    assert {n for n, t in tags.items() if MODEL_TAG in t} == front  # the search logged the Pareto models
    assert tags[0]["baseline"] == "uniform l1_unstructured 0.5"

    # 'autoprune report' rebuilds an MLflow store from the study and the work dir alone (here a new, empty one).
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    sets = [arg for item in [*overrides, f"tracking.uri={fresh}"] for arg in ("--set", item)]
    proc = cli("report", str(tiny_project), *sets, "--register", "tiny-pruned", cwd=tmp_path)
    assert "(created: the store had none)" in proc.stdout
    assert f"MLflow models logged now: {', '.join(str(r['trial']) for r in summary.front)}" in proc.stdout
    client = MlflowClient(fresh)
    tags = children(client)
    assert sorted(tags) == [0, 1, 2, 3]
    assert {n for n, t in tags.items() if t["pareto"] == "true"} == front
    exp = client.get_experiment_by_name("tiny")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags["autoprune.role"] == "study")
    assert parent.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(parent.info.run_id, HYPERVOLUME)] == [1, 2, 3, 4]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {FRONT_CSV, FRONT_JSON, CHART_HTML,
                                                                           CHART_PNG, SUMMARY_MD}
    versions = client.search_model_versions("name = 'tiny-pruned'")
    assert sorted(int(v.tags["autoprune.trial"]) for v in versions) == sorted(front)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh)
    loaded = mlflow.pytorch.load_model("models:/tiny-pruned/1")
    assert loaded(torch.zeros(3, 1, 8, 8)).shape == (3, 10)

    # Again: nothing is logged twice.
    proc = cli("report", str(tiny_project), *sets, "--register", "tiny-pruned", cwd=tmp_path)
    assert "MLflow models logged now: none (all were there)" in proc.stdout
    assert [m.step for m in client.get_metric_history(parent.info.run_id, HYPERVOLUME)] == [1, 2, 3, 4]
    assert len(client.search_model_versions("name = 'tiny-pruned'")) == len(front)
    assert len(children(client)) == 4

    # ui --print: the exact command and the deep links, nothing started
    proc = cli("ui", str(tiny_project), *sets, "--port", "5123", "--print", cwd=tmp_path)
    run_link = f"http://127.0.0.1:5123/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
    assert f"{run_link}?workflowType=machine_learning" in proc.stdout
    assert f"{run_link}/artifacts/pareto_front.html?workflowType=machine_learning" in proc.stdout
    assert (f"MLFLOW_BACKEND_STORE_URI={fresh} " in proc.stdout  # in the environment, never on the command line
            and "server --host 127.0.0.1 --port 5123 --workers 1" in proc.stdout)
    assert "--backend-store-uri" not in proc.stdout

    # dashboard: optuna-dashboard is not a dependency; say how to get it, claim nothing
    proc = cli("dashboard", str(tiny_project), "--print", cwd=tmp_path)
    assert f"optuna-dashboard {config.storage_url} --host 127.0.0.1 --port 8080" in proc.stdout
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        proc = cli("dashboard", str(tiny_project), cwd=tmp_path, check=False)
        assert proc.returncode == 1
        assert "optuna-dashboard is not installed" in proc.stderr and "-m pip install optuna-dashboard" in proc.stdout


def test_ui_refuses_a_missing_store(tiny_project: Path, tmp_path: Path) -> None:
    proc = cli("ui", str(tiny_project), "--print", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "no MLflow store at" in proc.stderr and "autoprune run" in proc.stderr
    assert not (tiny_project.parent / "work" / "mlflow.db").exists()


def test_log_models_off_logs_no_models(tiny_project: Path) -> None:
    from autoprune.config import load_config
    from autoprune.search import run_search

    config = load_config(tiny_project, ["execution.backend=in_process", "study.n_trials=2",
                                        "model.pretrain.epochs=1", "tracking.log_models=false"])
    summary = run_search(config)
    assert summary.front
    client = MlflowClient(config.tracking_uri)
    exp = client.get_experiment_by_name("tiny")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("autoprune.role") == "trial"]
    assert len(runs) == 2
    assert not any(MODEL_TAG in r.data.tags for r in runs)
