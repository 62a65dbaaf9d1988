"""Where studies live: Optuna's RDB storage with reconnects, and the URLs of the three stores.

Storage calls are retried with backoff when the database connection fails (a PostgreSQL restart, a
network blip), and give up with :class:`~autoprune.errors.StorageError` after a bounded time. URLs are
masked (passwords) wherever they are stored or shown; Optuna, MLflow and autoprune's registry must
each have their own database.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from .errors import StorageError
from .retry import STORAGE_RETRY_S, call_with_retries, first_line, safe_url

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


