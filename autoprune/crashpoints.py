"""Named crash points: every place where the driver writes state, where a test can make it die.

A search must survive being killed at any instant. To test that without timing luck, each
place where the driver writes to the study, the work dir, MLflow or the registry calls
:func:`crash_point` with its name. Normally that is a dictionary lookup and nothing else.
With the environment variable ``AUTOPRUNE_CRASH_AT`` set to ``NAME`` or ``NAME:PASS`` or
``NAME:PASS:SIGNAL`` (``KILL``, the default, or ``INT`` for Ctrl-C), the process sends itself
that signal on the ``PASS``-th time (1-based, default 1) it reaches point ``NAME``. ``WAIT`` instead
of a signal holds the process there until the file named by ``AUTOPRUNE_CRASH_GATE`` exists: a test
can then act (start a second driver, stop the database) at an exact point of the search.

``tests/test_crash_sweep.py`` kills a search at every point in :data:`POINTS` and checks
that ``resume`` repairs everything; a point added to the code must be listed here.
"""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "AUTOPRUNE_CRASH_AT"
GATE_ENV = "AUTOPRUNE_CRASH_GATE"

POINTS: dict[str, str] = {
    # study and driver records
    "study.created": "the Optuna study exists, before its config snapshot and seed trials are stored",
    "study.seeded": "the seed trials (sensitivity, baselines) are enqueued",
    "dense.measured": "the dense baseline is stored in the study",
    "driver.beat": "a driver record (identity, heartbeat) was written",
    "registry.recorded": "the search's row in autoprune's registry was written",
    # asking for a trial
    "ask.created": "a new trial exists in the study, before any parameter is written",
    "ask.param": "one parameter of the new trial was written (passes count parameters)",
    "ask.tagged": "the new trial is complete and tagged with its driver",
    "trial.submitted": "the trial was handed to the executor",
    # a finished trial
    "trial.files_saved": "the pruned model's files are in the work dir",
    "tell.attrs": "the trial's metrics are stored as attributes, before Optuna's tell",
    "tell.done": "Optuna holds the trial's result",
    # MLflow
    "mlflow.child_created": "a trial's child run was created, before its params and metrics",
    "mlflow.child_logged": "a trial's params, metrics and plan were logged, before the run is ended",
    "mlflow.child_ended": "a trial's child run is finished",
    "mlflow.tag": "one Pareto tag was set on a trial run",
    "mlflow.history": "hypervolume/front-size points were logged on the parent run",
    "mlflow.parent_files": "the front's files were logged on the parent run",
    "mlflow.model_created": "a logged model was created, before its files are uploaded",
    "mlflow.model_done": "a Pareto trial's model is logged and linked to its run",
    "mlflow.parent_ended": "the parent run was ended",
}

WAIT = "WAIT"
_SIGNALS: dict[str, signal.Signals | str] = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM,
                                             WAIT: WAIT}
_passes: dict[str, int] = {}
_lock = threading.Lock()


def parse(spec: str) -> tuple[str, int, signal.Signals | str]:
    """``NAME[:PASS[:SIGNAL]]`` -> (name, pass, signal); a ValueError quotes what is wrong."""
    name, _, rest = spec.partition(":")
    count, _, sig = rest.partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown crash point {name!r}; known points: {', '.join(POINTS)}")
    if count and not (count.isdigit() and int(count) >= 1):
        raise ValueError(f"{ENV}={spec!r}: expected a pass number >= 1, got {count!r}")
    if sig and sig.upper() not in _SIGNALS:
        raise ValueError(f"{ENV}={spec!r}: expected a signal in {sorted(_SIGNALS)}, got {sig!r}")
    return name, int(count or 1), _SIGNALS[(sig or "KILL").upper()]


def crash_point(name: str) -> None:
    """Die here if ``AUTOPRUNE_CRASH_AT`` names this point and pass; otherwise do nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if name not in POINTS:
        raise ValueError(f"crash point {name!r} is not listed in autoprune.crashpoints.POINTS")
    target, at_pass, sig = parse(spec)
    if target != name:
        return
    with _lock:
        _passes[name] = _passes.get(name, 0) + 1
        hit = _passes[name] == at_pass
    if hit and sig == WAIT:
        gate = os.environ.get(GATE_ENV)
        if not gate:
            raise ValueError(f"{ENV}={spec!r}: WAIT needs {GATE_ENV}, the file to wait for")
        while not os.path.exists(gate):
            time.sleep(0.05)
    elif hit:
        os.kill(os.getpid(), sig)  # SIGINT: KeyboardInterrupt in the main thread at its next bytecode
