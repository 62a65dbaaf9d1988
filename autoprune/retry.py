"""Database calls that survive a restart: which errors are transient, bounded retries with
backoff, and URLs with their passwords masked. Shared by the Optuna storage (study.py) and the
MLflow tracker (tracking.py); depends on SQLAlchemy only."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from .errors import StorageError

log = logging.getLogger("autoprune")
T = TypeVar("T")

#: How long a database may stay unreachable before a call gives up.
STORAGE_RETRY_S = 60.0


#: Query-string keys whose values are secrets (``...?password=...``): masked like ``user:password@``.
SECRET_KEYS = frozenset({"password", "passwd", "pwd", "pass", "secret", "token", "access_token", "auth_token",
                         "api_key", "apikey", "sslpassword", "client_secret"})


def _secret_key(key: str) -> bool:
    return key.lower() in SECRET_KEYS


def has_secret(url: str) -> bool:
    """Whether ``url`` holds a password (``user:pw@host`` or a secret query-string key)."""
    try:
        parsed = make_url(url)
    except Exception:
        return False
    return parsed.password is not None or any(_secret_key(k) for k in parsed.query)


def safe_url(url: str) -> str:
    """``url`` with any password (``user:pw@``, ``?password=``) replaced by ``***``, for messages and logs."""
    try:
        parsed = make_url(url)
        secrets = [k for k in parsed.query if _secret_key(k)]
        if secrets:
            parsed = parsed.update_query_dict({k: "***" for k in secrets})
        return parsed.render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")
    except Exception:
        return url.split(":", 1)[0] + ":..."


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>,;()]+")


def mask_urls(text: str) -> str:
    """``text`` with the password of every URL in it masked (for error lines that quote a URL)."""
    return _URL_IN_TEXT.sub(lambda m: safe_url(m.group(0)) if has_secret(m.group(0)) else m.group(0), text)


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other URLs and in-memory SQLite)."""
    try:
        parsed = make_url(url)
    except Exception:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


_LOCK_GUARD = threading.Lock()
_LOCKS: dict[str, threading.RLock] = {}
_HELD: dict[str, list[int]] = {}  # directory -> [depth, fd]


@contextlib.contextmanager
def store_lock(url: str) -> Iterator[None]:
    """Serialise the creation and migration of a SQLite store between processes on this machine (two
    ``autoprune run`` started at once on a fresh work dir): an exclusive ``flock`` on the directory of its
    file, which creates nothing. Re-entrant within a process (the work dir's three stores share one lock);
    a no-op for other URLs, for a directory that does not exist yet, and where ``flock`` is unsupported."""
    path = sqlite_file(url)
    directory = path.parent if path is not None else None
    if directory is None or not directory.is_dir():
        yield
        return
    key = str(directory.resolve())
    with _LOCK_GUARD:
        lock = _LOCKS.setdefault(key, threading.RLock())
    with lock:
        held = _HELD.setdefault(key, [0, -1])
        if held[0] == 0:
            fd = os.open(key, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without flock: go on unlocked, as before
                pass
            held[1] = fd
        held[0] += 1
        try:
            yield
        finally:
            held[0] -= 1
            if held[0] == 0:
                os.close(held[1])  # releases the flock
                held[1] = -1


#: Seconds a reachability check waits for a database server to answer.
CONNECT_TIMEOUT_S = 5

#: Driver modules SQLAlchemy may need, and what to install for each.
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pg8000": "pg8000",
                   "asyncpg": "asyncpg", "pymysql": "pymysql", "MySQLdb": "mysqlclient",
                   "mysql": "mysql-connector-python", "pyodbc": "pyodbc", "oracledb": "oracledb",
                   "cx_Oracle": "cx_Oracle"}


def check_reachable(url: str, field: str) -> None:
    """Fail fast, with one line naming ``field``, if the store at ``url`` cannot be reached; creates nothing.

    A database URL (not SQLite: its file is created on first use) is opened with SQLAlchemy with a
    short connect timeout and closed again; a missing driver module says which package to install.
    An ``http(s)://`` URL (an MLflow server) gets a TCP connect to its host and port. Other URLs pass.
    """
    import socket
    from urllib.parse import urlsplit

    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    shown = safe_url(url)
    if scheme in ("http", "https"):
        parts = urlsplit(url)
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise StorageError(f"field {field!r}: expected a URL with a numeric port, got {shown}") from None
        try:
            socket.create_connection((parts.hostname or "localhost", port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise StorageError(f"field {field!r}: cannot reach {shown}: {type(exc).__name__}: "
                               f"{exc.strerror or exc}") from None
        return
    try:
        parsed = make_url(url)
    except Exception:
        return  # not a database URL (file:, databricks, ...): the store's own client reports problems
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return
    import sqlalchemy

    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if backend in ("postgresql", "mysql", "mariadb") else {}
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        package = DRIVER_PACKAGES.get(module, module)
        raise StorageError(f"field {field!r}: the database driver module {module!r} for {shown} is not installed; "
                           f"install it with: pip install {package!r}") from None
    except Exception as exc:
        raise StorageError(f"field {field!r}: cannot use {shown}: {first_line(exc, url)}") from None
    try:
        with engine.connect():
            pass
    except Exception as exc:
        raise StorageError(f"field {field!r}: cannot connect to {shown} (waited at most {CONNECT_TIMEOUT_S} s): "
                           f"{first_line(exc, url)}") from None
    finally:
        engine.dispose()



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
