"""Database calls that survive a restart: which errors are transient, bounded retries with
backoff, and URLs with their passwords masked. Shared by the Optuna storage (study.py) and the
MLflow tracker (tracking.py); depends on SQLAlchemy only."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from .errors import StorageError

log = logging.getLogger("autoprune")
T = TypeVar("T")

#: How long a database may stay unreachable before a call gives up.
STORAGE_RETRY_S = 60.0


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split(":", 1)[0] + ":..."



def is_transient(exc: BaseException) -> bool:
    """A lost or refused database connection (worth retrying), as opposed to a bad query, bad data, a wrong
    password or a missing database."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.DBAPIError):
            if current.connection_invalidated:
                return True
            orig = current.orig
            state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
            if state:  # SQLSTATE classes: connection, operator intervention, resources, deadlock/serialization
                return str(state)[:2] in ("08", "57", "53", "40")
            if isinstance(current, (sa_exc.OperationalError, sa_exc.InterfaceError)):
                if "sqlite" in type(orig).__module__:
                    return any(word in str(orig).lower() for word in ("locked", "busy"))
                return True  # no SQLSTATE: the connection could not be made, or was lost
        if isinstance(current, ConnectionError):
            return True
        current = current.__cause__ or current.__context__
    return False


def first_line(exc: BaseException, url: str) -> str:
    """The first line of the root database error (Optuna wraps it in a misleading 'invalid data' message)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.DBAPIError) and current.orig is not None:
            exc = current.orig
            break
        current = current.__cause__ or current.__context__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text.replace(url, safe_url(url))}"


def call_with_retries(fn: Callable[[], T], url: str, what: str, retry_s: float = STORAGE_RETRY_S) -> T:
    """``fn()``, retried with exponential backoff (0.25 s doubling, at most 5 s) while the database
    connection fails, for at most ``retry_s`` seconds; then :class:`StorageError` (password masked)."""
    started = time.monotonic()
    delay, attempt = 0.25, 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            attempt += 1
            waited = time.monotonic() - started
            if waited + delay > retry_s:
                raise StorageError(
                    f"storage {safe_url(url)} unreachable: {what} failed {attempt} times over {waited:.1f} s "
                    f"({first_line(exc, url)}); finished trials are kept, continue with 'autoprune resume' "
                    f"once the database is back") from None
            log.warning("storage %s: %s failed (%s); retry %d in %.2f s", safe_url(url), what,
                        first_line(exc, url), attempt, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
