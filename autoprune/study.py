"""The Optuna study: storage, sampler, directions, drivers and crash recovery.

The only module that creates or loads studies. Objectives are fixed:
accuracy (maximize), size on disk in bytes (minimize), latency in ms (minimize).

Several drivers (``autoprune run`` / ``resume`` processes, possibly on several
machines) may work on one study in one RDB storage. Each has an identity and a
heartbeat in the study's user attributes, tags the trials it asks for, and asks
only under a study-wide lock while the study holds fewer than ``n_trials``
finished-or-running trials, so together they never run more than the target.
A trial left RUNNING by a driver that is gone (its process is dead, it stopped,
or its heartbeat is older than :data:`STALE_AFTER_S`) is marked FAIL and its
parameters are enqueued again; the trials of a live driver are never touched.

Storage calls are retried with backoff when the database connection fails (a
PostgreSQL restart, a network blip), and give up with :class:`StorageError`
after a bounded time.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.samplers import BaseSampler
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from .crashpoints import crash_point
from .errors import StorageError
from .plan import TrialResult
from .retry import STORAGE_RETRY_S, call_with_retries, first_line, safe_url

log = logging.getLogger("autoprune")

OBJECTIVES = ("accuracy", "size_bytes", "latency_ms")
DIRECTIONS = ("maximize", "minimize", "minimize")

CONFIG_ATTR = "autoprune.config"
DIGEST_ATTR = "autoprune.config_digest"
DENSE_ATTR = "autoprune.dense"
REASON_ATTR = "fail_reason"
STALE_ATTR = "autoprune.stale"
BASELINE_ATTR = "autoprune.baseline"
EXTRA_ATTR = "autoprune.extra"
UNIT_HIGH_ATTR = "autoprune.unit_high"
SEEDED_ATTR = "autoprune.seeded"
"""Study user attribute: the study's records and seed trials are all stored (a crash may come before)."""
RETRY_OF_ATTR = "autoprune.retry_of"
DRIVER_ATTR = "autoprune.driver"
"""Trial user attribute: the id of the driver that asked for the trial."""
WORKER_ATTR = "autoprune.worker"
"""Trial user attribute: where the trial ran (Ray node id, worker pid, shipped modules)."""
DRIVER_PREFIX = "autoprune.driver."
"""Study user attributes ``autoprune.driver.<id>``: each driver's identity and heartbeat."""

HEARTBEAT_S = float(os.environ.get("AUTOPRUNE_HEARTBEAT_S", "10"))
"""Seconds between a driver's heartbeats."""
STALE_AFTER_S = 6 * HEARTBEAT_S
"""A driver whose last heartbeat is older than this is gone (clocks of the drivers' machines must agree)."""
"""How long a storage call keeps retrying a lost database connection before StorageError."""

T = TypeVar("T")


# ---------------------------------------------------------------- URLs and config snapshots
def _mask(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if isinstance(value, str) and "://" in value:
        from .retry import has_secret  # user:pw@host and ?password=... alike

        return safe_url(value) if has_secret(value) else value
    return value


def safe_snapshot(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The config snapshot with every database/tracking URL's password masked: what is stored and logged."""
    return _mask(dict(snapshot))


def snapshot_digest(snapshot: Mapping[str, Any]) -> str:
    """A short hash of a (masked) config snapshot, to detect edits on resume."""
    return hashlib.sha256(json.dumps(snapshot, sort_keys=True).encode()).hexdigest()[:16]


def _store_key(url: str) -> str:
    """What identifies the database behind ``url``: sqlite file path, or server/database without credentials."""
    try:
        parsed = make_url(url)
    except Exception:
        return url
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        return "sqlite:" + (str(Path(database).resolve()) if database and database != ":memory:" else ":memory:")
    default_ports = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "oracle": 1521}
    if parsed.get_backend_name() in default_ports:
        port = parsed.port or default_ports[parsed.get_backend_name()]
        return f"{parsed.get_backend_name()}://{(parsed.host or 'localhost').lower()}:{port}/{parsed.database or ''}"
    return parsed.set(password=None, drivername=parsed.get_backend_name()).render_as_string()


def ensure_distinct_stores(optuna_url: str, tracking_uri: str, db_url: str | None = None) -> None:
    """Refuse one database for two of Optuna, MLflow and autoprune's own tables (each has its own schema
    version table and refuses the others'). Called before anything is written."""
    stores = {"study.storage (Optuna)": optuna_url, "tracking.uri (MLflow)": tracking_uri}
    if db_url:
        stores["study.db_url (autoprune)"] = db_url
    seen: dict[str, str] = {}
    for field, url in stores.items():
        key = _store_key(url)
        if key in seen:
            raise StorageError(
                f"fields {seen[key]!r} and {field!r} point to the same database ({safe_url(url)}): Optuna, "
                f"MLflow and autoprune each keep their own schema version and refuse each other's tables; "
                f"use a separate database (file, or PostgreSQL database) for each")
        seen[key] = field


# ---------------------------------------------------------------- samplers
def make_sampler(name: str, seed: int) -> BaseSampler:
    """The sampler named in the config; it is not stored, so resume builds it again."""
    factories = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "nsga3": lambda: optuna.samplers.NSGAIIISampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
    }
    if name not in factories:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(sorted(factories))}")
    return factories[name]()


# ---------------------------------------------------------------- storage with reconnects
_RETRIED = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "create_new_trial", "_create_new_trial", "set_trial_param",
    "_set_trial_param", "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial",
    "get_all_trials", "_get_trials", "get_best_trial", "_get_best_trial_id", "get_trial_user_attrs",
    "get_trial_system_attrs", "record_heartbeat", "_get_stale_trial_ids",
)


class ResilientStorage(RDBStorage):
    """Optuna's RDB storage whose calls survive a database restart: a call that loses its connection is
    retried with backoff (``pool_pre_ping`` gives it a fresh connection) for at most ``retry_s`` seconds."""

    retry_s: float = STORAGE_RETRY_S
    _local = threading.local()

    def _retrying(self, name: str, call: Callable[[], T]) -> T:
        if getattr(self._local, "depth", 0):  # already inside a retried call: the outer one retries
            return call()
        attempts = [0]

        def attempt() -> T:
            attempts[0] += 1
            self._local.depth = 1
            try:
                return call()
            except UpdateFinishedTrialError:
                # A retried state change whose first attempt did commit before the connection dropped.
                if name == "set_trial_state_values" and attempts[0] > 1:
                    return True  # type: ignore[return-value]
                raise
            finally:
                self._local.depth = 0

        return call_with_retries(attempt, self.url, name.lstrip("_"), self.retry_s)


def _retried_method(name: str) -> Callable[..., Any]:
    original = getattr(RDBStorage, name)

    @functools.wraps(original)
    def method(self: ResilientStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(name, lambda: original(self, *args, **kwargs))

    return method


for _name in _RETRIED:
    if hasattr(RDBStorage, _name):
        setattr(ResilientStorage, _name, _retried_method(_name))


def open_storage(url: str, retry_s: float = STORAGE_RETRY_S) -> ResilientStorage:
    """Open (and create tables in) the Optuna RDB storage at ``url``; later calls ride out restarts."""
    for attempt in range(3):
        try:
            storage = ResilientStorage(url, engine_kwargs={"pool_pre_ping": True})
            break
        except sa_exc.IntegrityError:  # another process created Optuna's tables at the same moment: look again
            if attempt == 2:
                raise StorageError(f"field 'study.storage': cannot create Optuna's tables in {safe_url(url)}") from None
            time.sleep(0.5)
        except Exception as exc:
            raise StorageError(f"field 'study.storage': cannot open {safe_url(url)}: {first_line(exc, url)}"
                               ) from None
    storage.retry_s = retry_s
    return storage


# ---------------------------------------------------------------- studies
def _exists(storage: RDBStorage, name: str) -> bool:
    return any(s.study_name == name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


def ensure_absent(storage: RDBStorage, name: str) -> None:
    """Refuse to start a study whose name is taken, pointing to ``resume``."""
    if _exists(storage, name):
        raise StorageError(
            f"study {name!r} already exists in {safe_url(storage.url)}; continue it with "
            f"'autoprune resume', or set another study.name"
        )


def create_study(storage: RDBStorage, name: str, sampler: BaseSampler, snapshot: Mapping[str, Any],
                 digest: str) -> optuna.Study:
    """A new study with the (password-masked) config snapshot stored in its user attributes."""
    ensure_absent(storage, name)
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, directions=list(DIRECTIONS))
    crash_point("study.created")
    record_config(study, snapshot, digest)
    return study


def record_config(study: optuna.Study, snapshot: Mapping[str, Any], digest: str) -> None:
    """Store the (password-masked) config snapshot and its digest, unless the study has them already."""
    if CONFIG_ATTR not in study.user_attrs:
        study.set_user_attr(CONFIG_ATTR, safe_snapshot(snapshot))
    if DIGEST_ATTR not in study.user_attrs:
        study.set_user_attr(DIGEST_ATTR, digest)


def load_study(storage: RDBStorage, name: str, sampler: BaseSampler) -> optuna.Study:
    """An existing study, with its directions checked against autoprune's objectives."""
    if not _exists(storage, name):
        raise StorageError(f"no study {name!r} in {safe_url(storage.url)}; start it with 'autoprune run'")
    study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
    expected = [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE, StudyDirection.MINIMIZE]
    if list(study.directions) != expected:
        raise StorageError(f"study {name!r} has directions {[d.name for d in study.directions]}, "
                           f"expected {[d.name for d in expected]}: it was not made by autoprune")
    return study


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


def _counted(t: FrozenTrial) -> bool:
    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get(STALE_ATTR))


def counted_trials(study: optuna.Study) -> int:
    """Trials that count toward ``n_trials``: finished ones, except those a dead driver left."""
    return sum(1 for t in study.get_trials(deepcopy=False) if _counted(t))


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


# ---------------------------------------------------------------- results
def _set_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def tell_success(study: optuna.Study, trial: optuna.Trial, result: TrialResult,
                 attrs: Mapping[str, Any] | None = None) -> bool:
    """Record a complete trial; False if another driver had already marked it stale (result dropped)."""
    try:
        _set_attrs(trial, {**result.as_metrics(), EXTRA_ATTR: dict(result.extra), **(attrs or {})})
        crash_point("tell.attrs")
        study.tell(trial, [result.accuracy, float(result.size_bytes), result.latency_ms])
        crash_point("tell.done")
    except (UpdateFinishedTrialError, ValueError):
        if not _taken_over(study, trial):
            raise
        log.warning("trial %d was marked stale by another driver; its result is dropped (its re-enqueued "
                    "copy runs instead)", trial.number)
        return False
    return True


def _taken_over(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether another driver finished (marked stale) ``trial`` while this one was running it."""
    return study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING


def tell_failure(study: optuna.Study, trial: optuna.Trial, reason: str,
                 attrs: Mapping[str, Any] | None = None) -> bool:
    """Record a failed trial with its reason; False if another driver had already marked it stale."""
    try:
        _set_attrs(trial, {REASON_ATTR: reason[-4000:], **(attrs or {})})
        study.tell(trial, state=TrialState.FAIL)
    except (UpdateFinishedTrialError, ValueError):
        if not _taken_over(study, trial):
            raise
        return False
    return True


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto-optimal complete trials, by trial number."""
    return sorted(study.best_trials, key=lambda t: t.number)
