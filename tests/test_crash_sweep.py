"""The crash sweep: the driver is killed at every named crash point (autoprune.crashpoints.POINTS), then
``autoprune resume`` must leave a study and MLflow records as if nothing had happened.

Deterministic: the driver kills itself exactly at the point (``AUTOPRUNE_CRASH_AT``), no timing decides
where. Drivers are forked from a forkserver that has imported autoprune once, so a case costs the search
itself, not the imports. Invariants checked after each resume:
- resume exits 0 and the study holds exactly ``n_trials`` complete trials, none RUNNING or WAITING;
- every trial complete before the kill is unchanged;
- a trial the kill left running is FAIL with its reason, stale (not counted), and its plan ran again;
- every finished trial has exactly one finished MLflow child run, with its state, metrics and Pareto tag;
  no other trial runs; the parent run is finished and holds the front's files;
- every Pareto trial has exactly one MLflow model, and the study has no other.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
from helpers_infra import run_cli_in_child
from mlflow import MlflowClient
from optuna.trial import TrialState

from autoprune.crashpoints import ENV, POINTS
from autoprune.study import REASON_ATTR, RETRY_OF_ATTR, STALE_ATTR

N_TRIALS = 3
PARAMS_PER_TRIAL = 4  # conv1, conv2: method + sparsity each
PASSES = {
    # (pass, why): the pass chosen so that something is finished before the kill where possible
    "ask.param": 2,  # trial 0 (the enqueued baseline), half its parameters written
    "ask.created": 2,
    "ask.tagged": 2,
    "trial.submitted": 2,
    "trial.files_saved": 2,
    "tell.attrs": 2,
    "tell.done": 2,
    "mlflow.child_created": 2,
    "mlflow.child_logged": 2,
    "mlflow.child_ended": 2,
    "mlflow.tag": 2,
    "mlflow.history": 2,
}
CASES = [(point, PASSES.get(point, 1)) for point in POINTS] + [("ask.param", PARAMS_PER_TRIAL + 2)]

CONFIG = """
study: {{name: sweep, n_trials: {n}, sampler: random, seed: 0, baselines: [0.5]}}
work_dir: work
model:
  factory: "tinymod:make_model"
  checkpoint: {checkpoint}
data:
  factory: "tinymod:make_loaders"
space:
  methods: [l1_unstructured, l1_structured]
  sparsity: {{low: 0.1, high: 0.8, step: 0.1}}
finetune: {{epochs: 1, max_batches: 3}}
latency: {{rounds: 1, min_run_time: 0.001}}
execution: {{backend: in_process}}
tracking: {{log_models: {log_models}}}
"""


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.BaseContext:
    """A forkserver that imported autoprune's CLI and its heavy dependencies once (also those a driver imports
    lazily: torch's FLOP counter pulls in torch._dynamo, MLflow's and Optuna's SQL stores and alembic; together
    about 5 s of every driver process otherwise)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["helpers_infra", "autoprune.cli", "autoprune.search", "autoprune.report",
                                    "autoprune.charts", "autoprune.model_files", "mlflow", "mlflow.pytorch",
                                    "sklearn.datasets", "plotly.graph_objects", "matplotlib.pyplot",
                                    "torch_pruning", "torch.export", "torch._dynamo", "torch.utils.flop_counter",
                                    "mlflow.store.tracking.sqlalchemy_store", "optuna.storages._rdb.storage",
                                    "alembic.command"])
    return context


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CNN trained once for every case (the cases start from a checkpoint)."""
    from conftest import TINY_MODULE

    directory = tmp_path_factory.mktemp("dense")
    namespace: dict = {}
    exec(compile(TINY_MODULE, "tinymod", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["make_model"]()
    train_loader, _ = namespace["make_loaders"]()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(4):
        for x, y in train_loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    path = directory / "dense.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def empty_stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Empty MLflow, Optuna and registry databases, made once and copied into each case's work dir
    (creating MLflow's tables takes 1-2 s)."""
    from autoprune import db
    from autoprune.storage import open_storage
    from autoprune.tracking import Tracker

    directory = tmp_path_factory.mktemp("stores")
    Tracker(f"sqlite:///{directory / 'mlflow.db'}", "unused")
    open_storage(f"sqlite:///{directory / 'optuna.db'}").engine.dispose()
    db.prepare(f"sqlite:///{directory / 'autoprune.db'}")
    return directory


MODEL_POINTS = ("mlflow.model_created", "mlflow.model_done", "mlflow.parent_ended")
"""Points where MLflow models matter; the other cases skip logging them (torch.export costs seconds)."""


def _project(directory: Path, checkpoint: Path, stores: Path, log_models: bool = True) -> Path:
    from conftest import TINY_MODULE

    (directory / "tinymod.py").write_text(TINY_MODULE)
    (directory / "work").mkdir()
    for name in ("mlflow.db", "optuna.db", "autoprune.db"):
        shutil.copyfile(stores / name, directory / "work" / name)
    config = directory / "search.yaml"
    config.write_text(textwrap.dedent(CONFIG.format(n=N_TRIALS, checkpoint=checkpoint,
                                                    log_models=str(log_models).lower())))
    return config


def _study(directory: Path) -> optuna.Study:
    return optuna.load_study(study_name="sweep", storage=f"sqlite:///{directory / 'work' / 'optuna.db'}")


def _check_invariants(directory: Path, before: dict[int, optuna.trial.FrozenTrial],
                      models_logged: bool = True) -> dict[str, int]:
    study = _study(directory)
    trials = study.get_trials()
    by_number = {t.number: t for t in trials}
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == N_TRIALS, [(t.number, t.state, t.user_attrs) for t in trials]
    assert not {TrialState.RUNNING, TrialState.WAITING} & set(states)
    lost = 0
    for number, old in before.items():
        if old.state == TrialState.COMPLETE:  # kept as it was
            assert by_number[number].state == TrialState.COMPLETE and by_number[number].values == old.values
        elif old.state == TrialState.RUNNING:  # failed as stale, with a reason, and run again
            trial = by_number[number]
            assert trial.state == TrialState.FAIL and trial.user_attrs[STALE_ATTR] is True
            assert trial.user_attrs[REASON_ATTR].startswith("driver stopped")
            copies = [t for t in trials if t.user_attrs.get(RETRY_OF_ATTR) == number]
            rerun_expected = "not run" not in trial.user_attrs[REASON_ATTR]
            assert len(copies) == int(rerun_expected)
            if copies and "parameters incomplete" not in trial.user_attrs[REASON_ATTR]:
                assert copies[0].params == old.params and copies[0].state == TrialState.COMPLETE
            lost += not rerun_expected and bool(old.system_attrs.get("fixed_params"))
    for trial in trials:  # no failure other than stale ones
        assert trial.state == TrialState.COMPLETE or trial.user_attrs.get(STALE_ATTR), trial.user_attrs

    client = MlflowClient(f"sqlite:///{directory / 'work' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("autoprune.role") == "study"]
    children = [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    numbers = [int(r.data.tags["autoprune.trial"]) for r in children]
    finished = sorted(t.number for t in trials if t.state.is_finished())
    duplicates = len(numbers) - len(set(numbers))
    assert sorted(numbers) == finished, (sorted(numbers), finished)
    pareto = {t.number for t in study.best_trials}
    models = {m.model_id for m in client.search_logged_models([experiment.experiment_id])}
    linked = set()
    for run in children:
        assert run.info.status in ("FINISHED", "FAILED")
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        trial = by_number[int(run.data.tags["autoprune.trial"])]
        assert run.data.tags["state"] == trial.state.name
        if trial.state == TrialState.COMPLETE:
            metrics = run.data.metrics
            assert [metrics["accuracy"], metrics["size_bytes"], metrics["latency_ms"]] == pytest.approx(trial.values)
            assert run.data.tags["pareto"] == ("true" if trial.number in pareto else "false")
            if trial.number in pareto and models_logged:
                linked.add(run.data.tags["autoprune.model_id"])
    assert models == linked  # one model per Pareto trial, no half-logged leftovers
    artifacts = {f.path for f in client.list_artifacts(parents[0].info.run_id)}
    assert {"pareto_front.csv", "pareto_front.json", "pareto_front.html", "summary.md"} <= artifacts
    return {"lost": lost, "duplicates": duplicates}


def _sweep_case(forkserver, stores: Path, dense_checkpoint: Path, tmp_path: Path, point: str, at_pass: int,
                how: str) -> None:
    config = _project(tmp_path, dense_checkpoint, stores, log_models=point in MODEL_POINTS)
    log = tmp_path / "run.log"
    child = forkserver.Process(target=run_cli_in_child, args=(
        ["run", str(config)], {ENV: f"{point}:{at_pass}:{how}"}, str(tmp_path), str(log)))
    child.start()
    child.join(timeout=300)
    assert child.exitcode is not None, "the driver did not stop"
    output = log.read_text()
    if how == "KILL":
        assert child.exitcode == -signal.SIGKILL, f"crash point {point}:{at_pass} was not reached\n{output}"
    else:
        assert child.exitcode == 130, f"exit {child.exitcode}\n{output}"
        assert "continue with 'autoprune resume" in output
        assert "Traceback" not in output, output
    before = {t.number: t for t in _study(tmp_path).get_trials()}

    resume_log = tmp_path / "resume.log"
    child = forkserver.Process(target=run_cli_in_child, args=(["resume", str(config)], {}, str(tmp_path),
                                                              str(resume_log)))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == 0, resume_log.read_text()
    figures = _check_invariants(tmp_path, before, models_logged=point in MODEL_POINTS)
    assert figures == {"lost": 0, "duplicates": 0}


INT_CASES = [("ask.param", 2), ("tell.done", 2), ("mlflow.child_logged", 2), ("mlflow.model_created", 1)]
ALL_CASES = [(point, at_pass, "KILL") for point, at_pass in CASES] + [(p, n, "INT") for p, n in INT_CASES]


@pytest.fixture(scope="module")
def sweep(forkserver, empty_stores: Path, dense_checkpoint: Path,
          tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int, str], str | None]:
    """Every case run once, two at a time (a case is one process at a time: a 2-core machine runs two side
    by side in the time of one); case -> None, or the failure with its traceback."""
    import traceback
    from concurrent.futures import ThreadPoolExecutor

    def run(case: tuple[str, int, str]) -> str | None:
        point, at_pass, how = case
        try:
            _sweep_case(forkserver, empty_stores, dense_checkpoint,
                        tmp_path_factory.mktemp(f"{point}-{at_pass}-{how}"), point, at_pass, how)
        except BaseException:
            return traceback.format_exc()
        return None

    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        return dict(zip(ALL_CASES, pool.map(run, ALL_CASES), strict=True))


@pytest.mark.parametrize(("point", "at_pass"), CASES, ids=[f"{p}:{n}" for p, n in CASES])
def test_sigkill_at_every_crash_point_then_resume(sweep, point: str, at_pass: int) -> None:
    failure = sweep[(point, at_pass, "KILL")]
    assert failure is None, failure


@pytest.mark.parametrize(("point", "at_pass"), INT_CASES, ids=[f"{p}:{n}" for p, n in INT_CASES])
def test_ctrl_c_at_crash_points_stops_cleanly_then_resume(sweep, point: str, at_pass: int) -> None:
    failure = sweep[(point, at_pass, "INT")]
    assert failure is None, failure


def test_every_crash_point_is_in_the_code() -> None:
    """Each listed point is reached by some crash_point call (a renamed call would drop out of the sweep)."""
    source = "\n".join(p.read_text() for p in Path(__file__).resolve().parents[1].joinpath("autoprune").rglob("*.py"))
    for point in POINTS:
        assert f'crash_point("{point}")' in source, point


def test_crash_spec_is_checked() -> None:
    from autoprune.crashpoints import parse

    assert parse("tell.done:3:INT") == ("tell.done", 3, signal.SIGINT)
    for bad in ("nowhere", "tell.done:0", "tell.done:x", "tell.done:1:HUP"):
        with pytest.raises(ValueError, match=ENV):
            parse(bad)
    os.environ.pop(ENV, None)


def test_resume_reports_missing_model_files_and_drops_runs_of_unknown_trials(
        empty_stores: Path, dense_checkpoint: Path, tmp_path: Path) -> None:
    """What resume finds that no crash point leaves (files deleted by hand, a run logged for a trial the study
    does not have) is repaired or reported in one line each, never a traceback."""
    from autoprune.config import load_config
    from autoprune.search import run_search
    from autoprune.workspace import Workspace

    config = load_config(_project(tmp_path, dense_checkpoint, empty_stores), ["tracking.log_models=false"])
    try:
        first = run_search(config)
        workspace = Workspace(config)
        for path in workspace.trial_dir(1).iterdir():
            path.unlink()
        client = MlflowClient(config.tracking_uri)
        experiment = client.get_experiment_by_name("sweep").experiment_id
        stray = client.create_run(experiment, tags={"mlflow.parentRunId": first.parent_run_id,
                                                    "autoprune.trial": "99", "autoprune.role": "trial"})
        client.set_terminated(stray.info.run_id)
        summary = run_search(load_config(config.base_dir / "search.yaml", ["tracking.log_models=false",
                                                                             "study.n_trials=4"]), resume=True)
    finally:
        sys.modules.pop("tinymod", None)
    assert summary.completed == 4
    assert any("trials [99]" in line for line in summary.notices), summary.notices
    assert any("complete trials [1] have no model files" in line for line in summary.notices), summary.notices
    assert client.get_run(stray.info.run_id).info.lifecycle_stage == "deleted"
