"""The study storage contract, on SQLite and on PostgreSQL: create, resume, front, crash recovery that
spares live drivers, a trial budget shared by concurrent drivers, reconnecting through a restart, and
one database per store."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
from helpers_infra import BACKENDS, PG_URL, pg_ctl, pg_database, postgres, stores, wait_for
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from autoprune.config import load_config
from autoprune.drivers import Driver, machine_id
from autoprune.errors import StorageError
from autoprune.retry import is_transient
from autoprune.search import run_search
from autoprune.storage import ensure_distinct_stores, open_storage, safe_snapshot
from autoprune.study import (
    DRIVER_ATTR,
    DRIVER_PREFIX,
    RETRY_OF_ATTR,
    STALE_ATTR,
    counted_trials,
    create_study,
    ensure_absent,
    load_study,
    make_sampler,
    pareto_trials,
)

DISTS = {"x": FloatDistribution(0.0, 1.0)}


def _new(url: str, name: str = "contract") -> optuna.Study:
    return create_study(open_storage(url), name, make_sampler("random", 0), {"study": {"name": name}}, "d")


def _tell(study: optuna.Study, trial: optuna.Trial, values: tuple[float, float, float]) -> None:
    study.tell(trial, list(values))


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_resume_front(backend: str, tmp_path: Path) -> None:
    with stores(backend, tmp_path) as urls:
        study = _new(urls["optuna"])
        with pytest.raises(StorageError, match="already exists"):
            ensure_absent(open_storage(urls["optuna"]), "contract")
        values = [(0.9, 100.0, 1.0), (0.8, 50.0, 1.0), (0.7, 60.0, 2.0), (0.95, 200.0, 0.5)]
        for v in values:
            _tell(study, study.ask(DISTS), v)
        failed = study.ask(DISTS)
        study.tell(failed, state=TrialState.FAIL)

        again = load_study(open_storage(urls["optuna"]), "contract", make_sampler("random", 0))
        assert [t.values for t in again.trials if t.state == TrialState.COMPLETE] == [list(v) for v in values]
        assert again.user_attrs["autoprune.config"] == {"study": {"name": "contract"}}
        assert counted_trials(again) == 5
        # trial 2 (0.7, 60, 2.0) is dominated by trial 1 (0.8, 50, 1.0); the others are on the front.
        assert [t.number for t in pareto_trials(again)] == [0, 1, 3]
        with pytest.raises(StorageError, match="no study 'other'"):
            load_study(open_storage(urls["optuna"]), "other", make_sampler("random", 0))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("backend", BACKENDS)
def test_recovery_spares_live_drivers(backend: str, tmp_path: Path) -> None:
    with stores(backend, tmp_path) as urls:
        study = _new(urls["optuna"])
        me = Driver(study, heartbeat_s=3600).start()
        now = time.time()
        here, away = machine_id(), "elsewhere/boot"
        others = {
            "dead-pid": {"machine": here, "pid": _dead_pid(), "start": None, "heartbeat": now, "stopped": False},
            "stopped": {"machine": away, "pid": 1, "heartbeat": now, "stopped": True},
            "silent": {"machine": away, "pid": 1, "heartbeat": now - 3600, "stopped": False},
            "live-here": {"machine": here, "pid": os.getpid(), "heartbeat": now, "stopped": False},
            "live-away": {"machine": away, "pid": 1, "heartbeat": now, "stopped": False},
        }
        for driver_id, record in others.items():
            study.set_user_attr(DRIVER_PREFIX + driver_id, record)
        owners = {}
        for driver_id in [*others, me.id]:
            trial = study.ask(DISTS)
            trial.set_user_attr(DRIVER_ATTR, driver_id)
            owners[trial.number] = (driver_id, trial.params)
        done = me.ask(DISTS, target=100)
        _tell(study, done, (0.5, 1.0, 1.0))

        recovered = me.recover_stale()
        expected = sorted(n for n, (d, _) in owners.items() if d in ("dead-pid", "stopped", "silent"))
        assert recovered == expected
        trials = {t.number: t for t in study.get_trials()}
        for number, (driver_id, params) in owners.items():
            trial = trials[number]
            if number in expected:
                assert trial.state == TrialState.FAIL and trial.user_attrs[STALE_ATTR] is True
                copies = [t for t in trials.values() if t.user_attrs.get(RETRY_OF_ATTR) == number]
                assert len(copies) == 1 and copies[0].state == TrialState.WAITING
                assert copies[0].system_attrs["fixed_params"] == params
            else:
                assert trial.state == TrialState.RUNNING, driver_id  # live drivers' and my own trials
        assert counted_trials(study) == 1  # stale failures do not count
        assert me.recover_stale() == []  # nothing twice
        me.stop()
        # A driver that stopped is gone at once: its running trials are recovered by the next one.
        later = Driver(study, heartbeat_s=3600)
        assert owners[max(owners)][0] == me.id
        assert max(owners) in later.recover_stale()


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_is_shared_by_concurrent_drivers(backend: str, tmp_path: Path) -> None:
    """Two drivers (own storages, own connections) asking as fast as they can never exceed the target."""
    target = 12
    with stores(backend, tmp_path) as urls:
        _new(urls["optuna"])
        ran: dict[str, list[int]] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def work(name: str) -> None:
            try:
                study = load_study(open_storage(urls["optuna"]), "contract", make_sampler("random", 1))
                driver = Driver(study, heartbeat_s=3600).start()
                barrier.wait()
                mine = ran.setdefault(name, [])
                while (trial := driver.ask(DISTS, target)) is not None:
                    mine.append(trial.number)
                    time.sleep(0.01)
                    _tell(study, trial, (trial.params["x"], 1.0, 1.0))
                driver.stop()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        study = load_study(open_storage(urls["optuna"]), "contract", make_sampler("random", 0))
        numbers = ran["a"] + ran["b"]
        assert len(study.trials) == target and sorted(numbers) == list(range(target))
        assert ran["a"] and ran["b"]
        assert all(t.state == TrialState.COMPLETE for t in study.trials)


def test_one_database_per_store(tmp_path: Path) -> None:
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    ensure_distinct_stores(a, b, f"sqlite:///{tmp_path / 'c.db'}")
    with pytest.raises(StorageError, match="same database"):
        ensure_distinct_stores(a, f"sqlite:///{tmp_path / 'x' / '..' / 'a.db'}")
    pg = "postgresql+psycopg://user:s3cret@db.example:5432/studies"
    with pytest.raises(StorageError, match=r"'study.storage \(Optuna\)' and 'tracking.uri \(MLflow\)'") as err:
        ensure_distinct_stores(pg, "postgresql://other:hunter2@DB.example:5432/studies")
    assert "s3cret" not in str(err.value) and "hunter2" not in str(err.value)
    with pytest.raises(StorageError, match=r"study\.db_url"):
        ensure_distinct_stores(pg, "postgresql://u@db.example/mlflow", "postgresql+psycopg2://x:y@db.example/studies")
    ensure_distinct_stores(pg, "postgresql://u@db.example/mlflow", "postgresql://u@db.example/autoprune")


def test_snapshot_masks_passwords() -> None:
    snapshot = {"study": {"storage": "postgresql+psycopg://u:s3cret@h/optuna", "name": "x"},
                "tracking": {"uri": "http://u:pw@mlflow:5000"}, "data": {"kwargs": {"path": "/a://b@c"}}}
    masked = safe_snapshot(snapshot)
    assert masked["study"]["storage"] == "postgresql+psycopg://u:***@h/optuna"
    assert "pw" not in masked["tracking"]["uri"] and masked["study"]["name"] == "x"
    assert masked["data"] == snapshot["data"]


def test_same_database_for_optuna_and_mlflow_is_refused_before_writing(tiny_project: Path) -> None:
    url = f"sqlite:///{tiny_project.parent / 'work' / 'both.db'}"
    config = load_config(tiny_project, [f"study.storage={url}", f"tracking.uri={url}",
                                        "execution.backend=in_process"])
    with pytest.raises(StorageError, match="same database"):
        run_search(config)
    assert not (tiny_project.parent / "work").exists()


def test_transient_errors_are_told_apart() -> None:
    import sqlite3

    from sqlalchemy import exc

    locked = exc.OperationalError("select", {}, sqlite3.OperationalError("database is locked"))
    missing = exc.OperationalError("select", {}, sqlite3.OperationalError("no such table: trials"))
    assert is_transient(locked) and not is_transient(missing)
    assert not is_transient(ValueError("bad value"))


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL or not os.environ.get("AUTOPRUNE_TEST_PG_CTL"),
                    reason="needs AUTOPRUNE_TEST_PG_URL and AUTOPRUNE_TEST_PG_CTL (scripts/test.sh)")
def test_storage_rides_out_a_restart_and_gives_up_after_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    with pg_database() as url:
        study = _new(url)
        _tell(study, study.ask(DISTS), (0.5, 1.0, 1.0))
        pg_ctl("stop", "-m", "fast", "-w")
        restarter = threading.Timer(3.0, lambda: pg_ctl("start", "-w"))
        restarter.start()
        try:
            started = time.monotonic()
            with caplog.at_level("WARNING", logger="autoprune"):
                trial = study.ask(DISTS)  # the database is down for about 3 s
                _tell(study, trial, (0.6, 1.0, 1.0))
            assert time.monotonic() - started >= 2.0
            assert any("retry" in r.getMessage() for r in caplog.records)
        finally:
            restarter.join()
        assert counted_trials(study) == 2

        storage = open_storage(url, retry_s=2.0)
        again = load_study(storage, "contract", make_sampler("random", 0))
        pg_ctl("stop", "-m", "fast", "-w")
        try:
            started = time.monotonic()
            with pytest.raises(StorageError, match="unreachable") as err:
                again.ask(DISTS)
            assert time.monotonic() - started < 10
            message = str(err.value)
            assert "autoprune-test" not in message and "***" in message and "autoprune resume" in message
        finally:
            pg_ctl("start", "-w")
        wait_for(lambda: again.trials is not None, 10, what="PostgreSQL back")


pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
__all__ = ["postgres"]
