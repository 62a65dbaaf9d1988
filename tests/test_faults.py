"""Faults on the real stack, with exact accounting: a trial that raises, Ray workers SIGKILLed mid-trial
(retried, then failed), the driver SIGKILLed mid-search and resumed, PostgreSQL stopped mid-search, and two
drivers sharing one PostgreSQL study.

Trials misbehave through ``faultmod`` (see helpers_infra.FAULT_MODULE): each attempt of a trial in a Ray
worker claims the next scripted action.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from helpers_infra import (
    PG_CTL,
    PG_URL,
    Driver,
    alive,
    attempts,
    pg_ctl,
    pg_database,
    stores,
    wait_for,
    write_fault_module,
)
from mlflow import MlflowClient
from optuna.trial import TrialState

from autoprune.config import load_config
from autoprune.drivers import driver_gone, driver_records
from autoprune.search import run_search
from autoprune.study import (
    DRIVER_ATTR,
    FAILURE_KIND_ATTR,
    REASON_ATTR,
    RETRY_OF_ATTR,
    STALE_ATTR,
    TRACEBACK_ATTR,
    WORKER_ATTR,
    counted_trials,
)

FAST = ["study.sampler=random", "model.pretrain.epochs=2", "finetune.epochs=1", "latency.rounds=1",
        "data.factory=faultmod:make_loaders"]


def _sets(overrides: list[str]) -> list[str]:
    args = []
    for item in overrides:
        args += ["--set", item]
    return args


@functools.cache
def _storage(url: str) -> optuna.storages.RDBStorage:
    """One storage (one connection pool) per database for the test's polling."""
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def _trials(storage: str, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        return []  # the driver has not got that far
    try:
        return optuna.load_study(study_name=name, storage=_storage(storage)).get_trials()
    except (KeyError, sqlalchemy.exc.IntegrityError):  # not created yet, or being created by the driver
        return []


def _trial_runs(tracking_uri: str, experiment: str = "tiny") -> tuple[list, list]:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]
    parents = [r for r in runs if r.data.tags.get("autoprune.role") == "study"]
    return children, parents


def _killer(control: Path, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the worker of every 'hang' attempt, once."""
    while not stop.is_set():
        for _, action, pid in attempts(control):
            if action == "hang" and pid not in killed:
                time.sleep(0.3)  # well inside the trial
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.1)


def test_raising_trial_fails_and_killed_workers_are_retried_then_failed(tiny_project: Path) -> None:
    """max_retries=1, one trial at a time. Scripted attempts:
    0 raise -> trial 0 FAIL (exceptions are not retried);
    1 hang (killed), 2 ok -> trial 1 COMPLETE after one retry;
    3 hang (killed), 4 hang (killed) -> trial 2 FAIL with WorkerCrashedError (retries used up);
    5 ok -> trial 3 COMPLETE."""
    control = write_fault_module(tiny_project.parent, ["raise", "hang", "ok", "hang", "hang", "ok"])
    config = load_config(tiny_project, [*FAST, "study.n_trials=4", "execution.parallel=1",
                                        "execution.max_retries=1"])
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_killer, args=(control, stop, killed), daemon=True)
    killer.start()
    try:
        summary = run_search(config)
    finally:
        stop.set()
        killer.join(timeout=10)

    seen = attempts(control)
    assert [(n, a) for n, a, _ in seen] == [(0, "raise"), (1, "hang"), (2, "ok"), (3, "hang"), (4, "hang"),
                                            (5, "ok")]
    pids = {n: pid for n, _, pid in seen}
    assert sorted(killed) == sorted([pids[1], pids[3], pids[4]])
    assert not any(alive(pid) for pid in killed)

    trials = optuna.load_study(study_name="tiny", storage=config.storage_url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "RuntimeError: injected failure in attempt 0" in trials[0].user_attrs[REASON_ATTR]
    assert trials[2].user_attrs[REASON_ATTR].startswith("WorkerCrashedError")
    assert "(attempts: 2)" in trials[2].user_attrs[REASON_ATTR]
    assert [trials[0].user_attrs[FAILURE_KIND_ATTR], trials[2].user_attrs[FAILURE_KIND_ATTR]] == ["user_code",
                                                                                                  "worker_lost"]
    assert "in __iter__" in trials[0].user_attrs[TRACEBACK_ATTR]  # the worker's traceback, through Ray
    assert trials[1].user_attrs[WORKER_ATTR]["worker_pid"] == pids[2]  # the retry's worker gave the result
    assert trials[3].user_attrs[WORKER_ATTR]["worker_pid"] == pids[5]
    assert (summary.completed, summary.failed) == (2, 2)
    assert counted_trials(optuna.load_study(study_name="tiny", storage=config.storage_url)) == 4

    children, parents = _trial_runs(config.tracking_uri)
    assert len(parents) == 1
    states = {int(r.data.tags["autoprune.trial"]): r.data.tags["state"] for r in children}
    assert states == {0: "FAIL", 1: "COMPLETE", 2: "FAIL", 3: "COMPLETE"}


def _mlflow_accounting(tracking_uri: str, trials: list[optuna.trial.FrozenTrial]) -> None:
    """One MLflow child run per finished trial, none twice, one parent run."""
    children, parents = _trial_runs(tracking_uri)
    numbers = sorted(int(r.data.tags["autoprune.trial"]) for r in children)
    assert numbers == sorted(t.number for t in trials if t.state.is_finished())
    assert len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}


@pytest.mark.slow
def test_driver_sigkill_then_resume(tiny_project: Path, tmp_path: Path) -> None:
    """The driver on Ray kills itself (SIGKILL) exactly when it hands trial 3 to Ray: two trials are complete,
    two running. ``resume`` fails those as stale, runs them again and finishes the study.
    (tests/test_crash_sweep.py kills the in-process driver at every other crash point.)"""
    n_trials = 5
    write_fault_module(tiny_project.parent, ["ok"])
    overrides = [*FAST, f"study.n_trials={n_trials}", "execution.parallel=2"]
    config = load_config(tiny_project, overrides)
    first = Driver("run", ["run", str(tiny_project), *_sets(overrides)], tmp_path,
                   AUTOPRUNE_CRASH_AT="trial.submitted:4:KILL")
    try:
        wait_for(lambda: (first.remember_tree(), first.proc.poll() is not None)[1], timeout=240, interval=0.2,
                 what="the driver to reach its crash point")
        assert first.proc.returncode == -signal.SIGKILL, first.output()
    finally:
        first.stop()

    before = {t.number: t for t in _trials(config.storage_url)}
    completed = {n: t.values for n, t in before.items() if t.state == TrialState.COMPLETE}
    stale = {n: t.params for n, t in before.items() if t.state == TrialState.RUNNING}
    # the 4th hand-over to Ray follows exactly two finished trials (which two depends on Ray), two are running
    assert len(completed) == 2 and len(stale) == 2 and 3 in stale, before
    dead = driver_records(optuna.load_study(study_name="tiny", storage=config.storage_url))
    assert len(dead) == 1 and driver_gone(next(iter(dead.values())))

    second = Driver("resume", ["resume", str(tiny_project), *_sets(overrides)], tmp_path)
    try:
        assert second.wait(timeout=300) == 0, second.output()
    finally:
        second.stop()
    assert f"re-enqueued trials left running by a stopped driver: {sorted(stale)}" in second.out.read_text()

    study = optuna.load_study(study_name="tiny", storage=config.storage_url)
    trials = study.get_trials()
    by_number = {t.number: t for t in trials}
    for number, values in completed.items():  # every completed trial kept as it was
        assert by_number[number].state == TrialState.COMPLETE and by_number[number].values == values
    for number, params in stale.items():  # marked FAIL (stale, not counted) and run again with the same params
        trial = by_number[number]
        assert trial.state == TrialState.FAIL and trial.user_attrs[STALE_ATTR] is True
        assert trial.user_attrs[REASON_ATTR] == "driver stopped before the trial finished"
        copies = [t for t in trials if t.user_attrs.get(RETRY_OF_ATTR) == number]
        assert len(copies) == 1 and copies[0].state == TrialState.COMPLETE and copies[0].params == params
    assert counted_trials(study) == n_trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) == n_trials
    assert len(trials) == n_trials + len(stale)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    _mlflow_accounting(config.tracking_uri, trials)


needs_pg_ctl = pytest.mark.skipif(not PG_URL or not PG_CTL, reason="needs AUTOPRUNE_TEST_PG_URL and "
                                                                    "AUTOPRUNE_TEST_PG_CTL (scripts/test.sh)")


@pytest.mark.slow
@pytest.mark.postgres
@needs_pg_ctl
def test_postgres_outage_mid_search(tiny_project: Path, tmp_path: Path) -> None:
    """PostgreSQL (Optuna, MLflow and autoprune's databases) stops for about 3 s while a trial runs: the
    driver retries its storage calls and the search finishes."""
    n_trials = 4
    write_fault_module(tiny_project.parent, ["slow"], slow_s=2.5)
    with stores("postgres", tmp_path) as urls:
        overrides = [*FAST, f"study.n_trials={n_trials}", "execution.parallel=1", f"study.storage={urls['optuna']}",
                     f"tracking.uri={urls['mlflow']}", f"study.db_url={urls['db']}"]
        config = load_config(tiny_project, overrides)
        gate = tmp_path / "gate"
        driver = Driver("run", ["run", str(tiny_project), *_sets(overrides)], tmp_path, AUTOPRUNE_HEARTBEAT_S="1",
                        AUTOPRUNE_CRASH_AT="trial.submitted:2:WAIT", AUTOPRUNE_CRASH_GATE=str(gate))
        try:
            def held_after_submitting_trial_1() -> bool:  # the driver holds right after handing trial 1 to Ray
                if driver.proc.poll() is not None:
                    raise AssertionError(f"driver exited early\n{driver.output()}")
                return any(t.number == 1 and t.state == TrialState.RUNNING for t in _trials(config.storage_url))

            wait_for(held_after_submitting_trial_1, timeout=240, interval=0.1, what="trial 1 running")
            pg_ctl("stop", "-m", "fast")
            gate.touch()  # the driver goes on into the outage: heartbeats every 1 s, trial 1's result in 2.5 s
            time.sleep(3)
            pg_ctl("start")
            assert driver.wait(timeout=300) == 0, driver.output()
        finally:
            with contextlib.suppress(Exception):
                pg_ctl("start")  # in case the test failed in between
            driver.stop()
        errors = driver.err.read_text()
        assert "retry" in errors and "autoprune-test" not in errors + driver.out.read_text()
        trials = _trials(config.storage_url)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * n_trials
        _mlflow_accounting(config.tracking_uri, trials)


@pytest.mark.slow
@pytest.mark.postgres
@needs_pg_ctl
def test_two_drivers_share_one_postgres_study(tiny_project: Path, tmp_path: Path) -> None:
    """'run' on one driver, 'resume' on a second while the first works: n_trials in all, each trial run
    by exactly one driver and logged to MLflow (on PostgreSQL too) once."""
    n_trials = 6
    write_fault_module(tiny_project.parent, ["slow"], slow_s=1.0)
    with stores("postgres", tmp_path) as urls:
        overrides = [*FAST, f"study.n_trials={n_trials}", "execution.parallel=1", f"study.storage={urls['optuna']}",
                     f"tracking.uri={urls['mlflow']}", f"study.db_url={urls['db']}"]
        config = load_config(tiny_project, overrides)
        gate = tmp_path / "gate"
        # the first driver holds after handing its second trial to Ray until the second driver runs one:
        # both drivers run trials, whatever the machine's speed
        first = Driver("first", ["run", str(tiny_project), *_sets(overrides)], tmp_path,
                       AUTOPRUNE_CRASH_AT="trial.submitted:2:WAIT", AUTOPRUNE_CRASH_GATE=str(gate))
        second = None
        try:
            wait_for(lambda: any(t.number == 1 and t.state == TrialState.RUNNING for t in _trials(config.storage_url)),
                     timeout=240, interval=0.3, what="the first driver's second trial")
            second = Driver("second", ["resume", str(tiny_project), *_sets(overrides)], tmp_path)

            def second_runs_a_trial() -> bool:
                if second.proc.poll() is not None:
                    raise AssertionError(f"second driver exited early\n{second.output()}")
                trials = _trials(config.storage_url)
                owners = {t.user_attrs.get(DRIVER_ATTR) for t in trials if t.number in (0, 1)}
                return any(t.state == TrialState.RUNNING and t.user_attrs.get(DRIVER_ATTR) not in owners
                           for t in trials)

            wait_for(second_runs_a_trial, timeout=240, interval=0.3, what="the second driver's first trial")
            gate.touch()
            assert first.wait(timeout=300) == 0, first.output()
            assert second.wait(timeout=300) == 0, second.output()
        finally:
            first.stop()
            if second is not None:
                second.stop()

        study = optuna.load_study(study_name="tiny", storage=config.storage_url)
        trials = study.get_trials()
        assert len(trials) == n_trials and counted_trials(study) == n_trials
        assert all(t.state == TrialState.COMPLETE for t in trials)
        owners = [t.user_attrs[DRIVER_ATTR] for t in trials]
        assert len(set(owners)) == 2, owners  # both drivers ran trials
        logged = [{int(n) for n in re.findall(r"^\s*trial (\d+): accuracy", d.out.read_text(), re.M)}
                  for d in (first, second)]
        assert not logged[0] & logged[1] and logged[0] | logged[1] == set(range(n_trials))
        _mlflow_accounting(config.tracking_uri, trials)


@pytest.mark.postgres
@needs_pg_ctl
def test_tracker_rides_through_a_postgres_restart(tmp_path: Path) -> None:
    """An MLflow call made while PostgreSQL is down waits for it (bounded retries) instead of failing."""
    import threading

    from autoprune.plan import Plan
    from autoprune.tracking import Tracker

    with pg_database("mlflow") as url:
        tracker = Tracker(url, "outage")
        parent = tracker.start_parent("s", {"a": 1}, {"accuracy": 0.9})
        pg_ctl("stop", "-m", "fast")
        restart = threading.Timer(2.0, pg_ctl, args=("start",))
        restart.start()
        try:
            started = time.monotonic()
            run_id = tracker.log_trial(parent, "s", 0, Plan(()), None, "during the outage")
            waited = time.monotonic() - started
        finally:
            restart.join()
        assert waited >= 1.5  # it did wait for the database
        assert tracker.client.get_run(run_id).info.status == "FAILED"
