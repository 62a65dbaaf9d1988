"""Several drivers on one study, and recovery from the ones that died.

Several drivers (``autoprune run`` / ``resume`` processes, possibly on several machines) may work on
one study in one RDB storage. Each has an identity and a heartbeat in the study's user attributes,
tags the trials it asks for, and asks only under a study-wide lock while the study holds fewer than
``n_trials`` finished-or-running trials, so together they never run more than the target. A trial
left RUNNING by a driver that is gone (its process is dead, it stopped, or its heartbeat is older
than :data:`STALE_AFTER_S`) is marked FAIL and its parameters are enqueued again; the trials of a
live driver are never touched. A trial is tagged with its driver only after its last parameter is
written, so one cut short while being asked for is recognised and never run with half a plan.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from .crashpoints import crash_point
from .retry import STORAGE_RETRY_S, call_with_retries
from .study import BASELINE_ATTR, DRIVER_ATTR, DRIVER_PREFIX, REASON_ATTR, RETRY_OF_ATTR, STALE_ATTR, _counted

log = logging.getLogger("autoprune")

HEARTBEAT_S = float(os.environ.get("AUTOPRUNE_HEARTBEAT_S", "10"))
"""Seconds between a driver's heartbeats."""
STALE_AFTER_S = 6 * HEARTBEAT_S
"""A driver whose last heartbeat is older than this is gone (clocks of the drivers' machines must agree)."""


# ---------------------------------------------------------------- drivers
def _process_start(pid: int) -> str | None:
    """The start time (clock ticks since boot) of process ``pid``, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def machine_id() -> str:
    """This machine: host name and kernel boot id (containers on one host have distinct host names)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _process_alive(pid: int, start: str | None) -> bool:
    if Path("/proc/self/stat").exists():
        now_start = _process_start(pid)
        return now_start is not None and (start is None or now_start == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def driver_gone(record: Mapping[str, Any], now: float | None = None, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether the driver described by ``record`` (a study user attribute) no longer works on the study."""
    now = time.time() if now is None else now
    if record.get("stopped"):
        return True
    if record.get("machine") == machine_id() and not _process_alive(int(record["pid"]), record.get("start")):
        return True
    return now - float(record.get("heartbeat", 0)) > stale_after_s


def driver_records(study: optuna.Study) -> dict[str, dict[str, Any]]:
    return {k[len(DRIVER_PREFIX):]: v for k, v in study.user_attrs.items() if k.startswith(DRIVER_PREFIX)}


def budget_used(trials: list[FrozenTrial]) -> int:
    """Trials that hold a place in ``n_trials``: finished ones (except stale failures) and running ones."""
    return sum(1 for t in trials if t.state == TrialState.RUNNING or _counted(t))


class StudyLock:
    """A lock across every driver of one study: a PostgreSQL advisory lock, a file lock beside a SQLite
    file, else (in-memory or other databases) a lock inside this process only."""

    def __init__(self, storage: Any, study_name: str) -> None:
        storage = getattr(storage, "_backend", storage)  # a study's storage is wrapped in Optuna's cache
        self._storage: RDBStorage = storage
        self._thread_lock = threading.Lock()
        url = storage.engine.url
        self._backend = url.get_backend_name()
        digest = hashlib.sha256(f"autoprune:{study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        database = url.database or ""
        self._path = (Path(database).resolve().parent / f".{Path(database).name}.{study_name}.lock"
                      if self._backend == "sqlite" and database not in ("", ":memory:") else None)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            if self._backend == "postgresql":
                with self._pg_lock():
                    yield
            elif self._path is not None:
                with open(self._path, "a+") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    try:
                        yield
                    finally:
                        fcntl.flock(handle, fcntl.LOCK_UN)
            else:
                yield

    @contextlib.contextmanager
    def _pg_lock(self) -> Iterator[None]:
        engine: sqlalchemy.Engine = self._storage.engine

        def acquire() -> sqlalchemy.Connection:
            conn = engine.connect()
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": self._key})
            except Exception:
                conn.close()
                raise
            return conn

        conn = call_with_retries(acquire, self._storage.url, "study lock",
                                 getattr(self._storage, "retry_s", STORAGE_RETRY_S))
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # a lost connection released the lock already
                conn.commit()
            with contextlib.suppress(Exception):
                conn.close()


@dataclass
class Driver:
    """This process as a driver of ``study``: identity, heartbeat thread, asking within the budget and
    recovering what dead drivers left."""

    study: optuna.Study
    heartbeat_s: float = HEARTBEAT_S
    stale_after_s: float = STALE_AFTER_S

    def __post_init__(self) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.lock = StudyLock(self.study._storage, self.study.study_name)
        self._stop = threading.Event()
        self._beat_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._record = {"host": socket.gethostname(), "machine": machine_id(), "pid": os.getpid(),
                        "start": _process_start(os.getpid()),
                        "started_at": time.time(), "heartbeat": time.time(), "stopped": False}

    # ---- identity and heartbeat ----
    def beat(self, stopped: bool = False) -> None:
        with self._beat_lock:
            if self._stop.is_set() and not stopped:
                return  # never revive a driver that announced it stopped
            self._record.update(heartbeat=time.time(), stopped=stopped)
            self.study.set_user_attr(DRIVER_PREFIX + self.id, dict(self._record))
            crash_point("driver.beat")

    def start(self) -> Driver:
        self.beat()
        self._thread = threading.Thread(target=self._beat_loop, name=f"autoprune-heartbeat-{self.id}", daemon=True)
        self._thread.start()
        return self

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except Exception as exc:  # the main thread reports storage trouble; keep beating
                log.warning("driver %s: heartbeat failed: %s", self.id, str(exc).splitlines()[0] if str(exc) else exc)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the heartbeat and mark this driver stopped, so its unfinished trials are recovered at once.
        Waits at most ``timeout`` s (the database may be gone; then the missing heartbeat tells the rest)."""
        self._stop.set()

        def last_beat() -> None:
            with contextlib.suppress(Exception):
                self.beat(stopped=True)

        final = threading.Thread(target=last_beat, name=f"autoprune-stop-{self.id}", daemon=True)
        final.start()
        final.join(timeout)

    # ---- trials ----
    def ask(self, distributions: Mapping[str, BaseDistribution], target: int) -> optuna.Trial | None:
        """A new (or enqueued) trial tagged with this driver, or None when finished and running trials of
        every driver already fill ``target``. Atomic across drivers (study lock)."""
        with self.lock.held():
            if budget_used(self.study.get_trials(deepcopy=False)) >= target:
                return None
            trial = self.study.ask()
            crash_point("ask.created")
            with warnings.catch_warnings():
                if BASELINE_ATTR in trial.user_attrs:  # a rule's allocation is enqueued as computed, even where it
                    # leaves a unit's range (autoprune.baselines): Optuna's warning per such unit is no news
                    warnings.filterwarnings("ignore", r"Fixed parameter .* is out of range", UserWarning)
                for name, distribution in distributions.items():  # Optuna writes them one by one
                    _suggest(trial, name, distribution)
                    crash_point("ask.param")
            trial.set_user_attr(DRIVER_ATTR, self.id)  # last: a trial without it was cut short while asked for
            crash_point("ask.tagged")
            return trial

    def others_alive(self) -> bool:
        return any(not driver_gone(r, stale_after_s=self.stale_after_s)
                   for d, r in driver_records(self.study).items() if d != self.id)

    def others_running(self) -> int:
        return sum(1 for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.user_attrs.get(DRIVER_ATTR) != self.id)

    def recover_stale(self) -> list[int]:
        with self.lock.held():
            return recover_stale_trials(self.study, me=self.id, stale_after_s=self.stale_after_s)


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> None:
    """Sample (or take the enqueued value of) one parameter through the public suggest API."""
    if isinstance(distribution, FloatDistribution):
        trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    elif isinstance(distribution, IntDistribution):
        trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    elif isinstance(distribution, CategoricalDistribution):
        trial.suggest_categorical(name, distribution.choices)
    else:
        raise TypeError(f"parameter {name!r}: unsupported distribution {distribution!r}")


def asked_completely(trial: FrozenTrial) -> bool:
    """Whether every parameter of ``trial`` was written: its driver tags it only after the last one."""
    return DRIVER_ATTR in trial.user_attrs


def stale_trials(study: optuna.Study, me: str | None = None, stale_after_s: float = STALE_AFTER_S) -> list[FrozenTrial]:
    """RUNNING trials whose driver is gone. A trial without a driver tag (an older autoprune, or one
    caught between ask and tag) is stale when no other driver is alive or it started ``stale_after_s`` ago."""
    now = time.time()
    records = driver_records(study)
    gone = {d: driver_gone(r, now, stale_after_s) for d, r in records.items()}
    any_alive = any(not g for d, g in gone.items() if d != me)
    stale = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(DRIVER_ATTR)
        if owner is not None and owner == me:
            continue
        if owner is not None and owner in gone:
            if gone[owner]:
                stale.append(trial)
            continue
        started = trial.datetime_start or datetime.now()
        if not any_alive or (datetime.now() - started).total_seconds() > stale_after_s:
            stale.append(trial)
    return stale


def recover_stale_trials(study: optuna.Study, me: str | None = None,
                         stale_after_s: float = STALE_AFTER_S) -> list[int]:
    """Trials left RUNNING by a driver that is gone: mark them FAIL (stale, not counted) and re-enqueue
    their params. Trials of live drivers (and of ``me``) are left alone. Returns the numbers marked."""
    storage = study._storage
    marked = []
    for trial in stale_trials(study, me, stale_after_s):
        params = _params_to_rerun(trial)
        reason = (STALE_REASON if asked_completely(trial) else
                  "driver stopped while the trial was being asked for (parameters incomplete); "
                  + ("its enqueued parameters run again" if params else "not run"))
        storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, reason)
        storage.set_trial_user_attr(trial._trial_id, STALE_ATTR, True)
        try:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # its driver finished it after all
        if params:
            study.enqueue_trial(params, user_attrs=_retry_attrs(trial), skip_if_exists=False)
        marked.append(trial.number)
    return marked


STALE_REASON = "driver stopped before the trial finished"


def _params_to_rerun(trial: FrozenTrial) -> dict[str, Any]:
    """The parameters to run a stale trial with again: all of them if it was asked for completely;
    else those it was enqueued with (a seed trial); else none (a sampled trial cut short has no plan)."""
    if asked_completely(trial):
        return dict(trial.params)
    return dict(trial.system_attrs.get("fixed_params") or {})


def _retry_attrs(trial: FrozenTrial) -> dict[str, Any]:
    attrs = {k: v for k, v in trial.user_attrs.items() if k == BASELINE_ATTR}
    attrs[RETRY_OF_ATTR] = trial.number
    return attrs


