"""Test helpers for the real infrastructure: a fresh PostgreSQL database per test, a two-node Ray cluster
on loopback, driver subprocesses, and process trees stopped by pid (never ``ray stop``).

PostgreSQL tests need ``AUTOPRUNE_TEST_PG_URL`` (a role with CREATEDB; ``scripts/test.sh`` starts a private
server and sets it) and are skipped with a reason without it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PG_URL = os.environ.get("AUTOPRUNE_TEST_PG_URL")
PG_CTL = os.environ.get("AUTOPRUNE_TEST_PG_CTL")
BIN = Path(sys.executable).parent

needs_pg = pytest.mark.skipif(not PG_URL, reason="AUTOPRUNE_TEST_PG_URL is not set (scripts/test.sh starts "
                                                 "PostgreSQL and sets it)")
postgres = [pytest.mark.postgres, needs_pg]

BACKENDS = ["sqlite", pytest.param("postgres", marks=postgres)]
"""Parametrize a storage-contract test over SQLite and PostgreSQL."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- PostgreSQL
def _admin(fn: Callable[[Any], None]) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(PG_URL)
    with psycopg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                         dbname="postgres", autocommit=True) as conn:
        fn(conn)


@contextlib.contextmanager
def pg_database(prefix: str = "ap") -> Iterator[str]:
    """A new, empty PostgreSQL database; yields its SQLAlchemy URL and drops it afterwards."""
    assert PG_URL, "AUTOPRUNE_TEST_PG_URL is not set"
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    _admin(lambda conn: conn.execute(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_URL.rstrip('/')}/{name}"
    finally:
        with contextlib.suppress(Exception):
            _admin(lambda conn: conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def stores(backend: str, directory: Path) -> Iterator[dict[str, str]]:
    """Separate Optuna, MLflow and autoprune databases on ``backend``: ``{'optuna', 'mlflow', 'db'}`` URLs."""
    if backend == "sqlite":
        yield {name: f"sqlite:///{directory / f'{name}.db'}" for name in ("optuna", "mlflow", "db")}
        return
    with pg_database("optuna") as optuna_url, pg_database("mlflow") as mlflow_url, pg_database("apdb") as db_url:
        yield {"optuna": optuna_url, "mlflow": mlflow_url, "db": db_url}


def pg_ctl(*args: str, timeout: float = 60) -> None:
    """Run the test server's pg_ctl (``AUTOPRUNE_TEST_PG_CTL``, set by scripts/services.sh)."""
    assert PG_CTL, "AUTOPRUNE_TEST_PG_CTL is not set"
    subprocess.run([*shlex.split(PG_CTL), *args], check=True, timeout=timeout, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------- Ray
@contextlib.contextmanager
def ray_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[Any]:
    """A multi-node Ray cluster on 127.0.0.1 inside this process (ray.cluster_utils.Cluster); shut down after."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


# ---------------------------------------------------------------- processes
def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    result, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            result.append(child)
            todo.append(child)
    return result


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def stop_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL what is left (Ray's gcs_server can ignore SIGTERM)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "COLUMNS": "200",
            **extra}


class Driver:
    """``autoprune ARGS`` as a subprocess with its output in files; stopped with its whole process tree."""

    def __init__(self, name: str, args: list[str], cwd: Path, **env: str) -> None:
        self.out = cwd / f"{name}.out"
        self.err = cwd / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([str(BIN / "autoprune"), *args], cwd=cwd, env=cli_env(**env), stdout=out,
                                         stderr=err, start_new_session=True)
        self.tree: set[int] = set()

    def remember_tree(self) -> None:
        if self.proc.poll() is None:
            self.tree.update(descendants(self.proc.pid))

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"driver timed out after {timeout} s\n{self.output()}") from None

    def kill(self) -> None:
        """SIGKILL the driver alone (what a crash does); its Ray processes are stopped in :meth:`stop`."""
        self.remember_tree()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.remember_tree()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        stop_pids(sorted(p for p in self.tree if alive(p)))

    def output(self) -> str:
        return f"--- stdout\n{self.out.read_text()}\n--- stderr\n{self.err.read_text()[-6000:]}"


# ---------------------------------------------------------------- fault injection in trials
FAULT_MODULE = '''
"""Digits loaders whose training loader misbehaves inside Ray workers, one scripted action per attempt.

Each trial attempt (a fresh copy of the loader in a worker) claims the next attempt number in CONTROL
(a directory) and does ACTIONS[attempt] (default: the last action): 'ok', 'slow' (sleep SLOW_S first),
'raise' (the trial fails), 'hang' (sleep until the test SIGKILLs the worker). The driver's own
iterations (pre-training, checks) pass through untouched.
"""
import os
import time

from tinymod import make_loaders as _tiny_loaders

CONTROL = {control!r}
ACTIONS = {actions!r}
SLOW_S = {slow_s!r}


def _claim():
    attempt = 0
    while True:
        try:
            fd = os.open(os.path.join(CONTROL, f"claim-{{attempt:03d}}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            return attempt
        except FileExistsError:
            attempt += 1


class FaultyLoader:
    def __init__(self, inner):
        self.inner = inner
        self.driver_pid = os.getpid()
        self.armed = True

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.armed = True  # every copy a worker receives is one attempt

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        if self.armed and os.getpid() != self.driver_pid:
            self.armed = False
            attempt = _claim()
            action = ACTIONS[min(attempt, len(ACTIONS) - 1)]
            path = os.path.join(CONTROL, f"{{attempt:03d}}-{{action}}-{{os.getpid()}}")
            open(path, "w").close()
            if action == "raise":
                raise RuntimeError(f"injected failure in attempt {{attempt}}")
            if action == "hang":
                time.sleep(300)
            if action == "slow":
                time.sleep(SLOW_S)
        return iter(self.inner)


def make_loaders(n=400, batch_size=50):
    train, val = _tiny_loaders(n, batch_size)
    return FaultyLoader(train), val
'''


def write_fault_module(project: Path, actions: list[str], slow_s: float = 2.0) -> Path:
    """``faultmod.py`` beside the tiny project; returns its control directory (attempt files appear there)."""
    control = project / "attempts"
    control.mkdir(exist_ok=True)
    sys.modules.pop("faultmod", None)  # an earlier test's copy (another CONTROL) must not be reused
    (project / "faultmod.py").write_text(textwrap.dedent(FAULT_MODULE.format(
        control=str(control), actions=list(actions), slow_s=slow_s)))
    return control


def attempts(control: Path) -> list[tuple[int, str, int]]:
    """``(attempt, action, worker pid)`` of every attempt so far, in order."""
    found = []
    for entry in control.iterdir():
        if entry.name.startswith("claim-"):
            continue
        number, action, pid = entry.name.split("-")
        found.append((int(number), action, int(pid)))
    return sorted(found)


# ---------------------------------------------------------------- drivers forked from a forkserver
def run_cli_in_child(argv: list[str], env: dict[str, str], cwd: str, log: str) -> None:
    """``autoprune ARGV`` in this (forked) process with ``env`` added, output to ``log``; exits with its code.

    Used as a ``multiprocessing`` target from a forkserver that imported autoprune already, so a driver
    starts in milliseconds; a crash point (``AUTOPRUNE_CRASH_AT``) may kill it anywhere.
    """
    os.environ.update({"COLUMNS": "200", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                       **env})
    os.chdir(cwd)
    # Ctrl-C as in a terminal, even when the test runner was started with SIGINT ignored (a background job
    # of a non-interactive shell is): Python only installs its KeyboardInterrupt handler if SIGINT was not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["autoprune", *argv]
    code = 1
    try:
        from autoprune.cli import main

        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
