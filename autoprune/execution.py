"""Where trials run: on Ray (local or an existing cluster) or in-process.

The only module that imports Ray. Both executors take the same inputs and give
back, per trial number, either a :class:`~autoprune.trial.TrialOutput` or the
reason it failed, so the search loop does not care where trials ran. The dense
model, the data and the settings are put in Ray's object store once.
"""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn

from .plan import Plan
from .trial import Batches, DenseBaseline, TrialOutput, TrialSettings, run_trial

Outcome = TrialOutput | str  # a string is the failure reason


@dataclass(frozen=True)
class TrialPayload:
    """What every trial of a study shares; shipped to workers once."""

    dense: nn.Module
    train_loader: Batches
    val_loader: Batches
    settings: TrialSettings
    baseline: DenseBaseline
    threads: int = 1


def execute(payload: TrialPayload, plan: Plan) -> TrialOutput:
    """Run one trial with the payload's settings (this is what a worker calls)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(payload.threads)
    try:
        return run_trial(payload.dense, payload.train_loader, payload.val_loader, plan,
                         payload.settings, payload.baseline)
    finally:
        torch.set_num_threads(previous)


def failure_reason(exc: BaseException) -> str:
    """A readable, bounded description of why a trial failed."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text[-2000:]


class Executor(Protocol):
    def submit(self, number: int, plan: Plan) -> None: ...

    def wait(self) -> list[tuple[int, Outcome]]:
        """Block until at least one submitted trial ends; return those that ended."""

    @property
    def running(self) -> int: ...

    def shutdown(self) -> None: ...


class InProcessExecutor:
    """Runs trials one at a time in this process: for debugging and small tests."""

    def __init__(self, payload: TrialPayload) -> None:
        self._payload = payload
        self._queue: list[tuple[int, Plan]] = []

    def submit(self, number: int, plan: Plan) -> None:
        self._queue.append((number, plan))

    def wait(self) -> list[tuple[int, Outcome]]:
        number, plan = self._queue.pop(0)
        try:
            return [(number, execute(self._payload, plan))]
        except Exception as exc:
            return [(number, failure_reason(exc))]

    @property
    def running(self) -> int:
        return len(self._queue)

    def shutdown(self) -> None:
        self._queue.clear()


def _ray_trial(payload: TrialPayload, plan: Plan) -> TrialOutput:
    return execute(payload, plan)


class RayExecutor:
    """One Ray task per trial; the driver keeps at most ``parallel`` in flight."""

    def __init__(
        self,
        payload: TrialPayload,
        *,
        address: str | None = None,
        parallel: int = 2,
        cpus_per_trial: float = 1.0,
        gpus_per_trial: float = 0.0,
        memory_per_trial_mb: int | None = None,
        max_retries: int = 0,
        modules: Sequence[ModuleType] = (),
    ) -> None:
        import ray

        self._ray = ray
        runtime_env: dict[str, Any] = {}
        if modules:
            runtime_env["py_modules"] = list(modules)
        init_kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": True,
            "configure_logging": True,
            "logging_level": "WARNING",
            "runtime_env": runtime_env or None,
        }
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if address:
                ray.init(address=address, **init_kwargs)
            else:
                # A private local Ray: keep it on loopback and without a login token.
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                num_cpus = max(1, math.ceil(parallel * cpus_per_trial))
                ray.init(num_cpus=num_cpus, num_gpus=math.ceil(parallel * gpus_per_trial) or None,
                         **init_kwargs)
        options: dict[str, Any] = {"num_cpus": cpus_per_trial, "max_retries": max_retries}
        if gpus_per_trial:
            options["num_gpus"] = gpus_per_trial
        if memory_per_trial_mb:
            options["memory"] = memory_per_trial_mb * 1024 * 1024
        self._remote = ray.remote(_ray_trial).options(**options)
        self._payload_ref = ray.put(payload)
        self._pending: dict[Any, int] = {}

    def submit(self, number: int, plan: Plan) -> None:
        ref = self._remote.remote(self._payload_ref, plan)
        self._pending[ref] = number

    def wait(self) -> list[tuple[int, Outcome]]:
        ready, _ = self._ray.wait(list(self._pending), num_returns=1)
        finished: list[tuple[int, Outcome]] = []
        for ref in ready:
            number = self._pending.pop(ref)
            try:
                finished.append((number, self._ray.get(ref)))
            except self._ray.exceptions.RayTaskError as exc:
                finished.append((number, failure_reason(exc.cause if exc.cause else exc)))
            except self._ray.exceptions.RayError as exc:  # worker or node died
                finished.append((number, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"))
        return finished

    @property
    def running(self) -> int:
        return len(self._pending)

    def shutdown(self) -> None:
        for ref in self._pending:
            self._ray.cancel(ref, force=True)
        self._pending.clear()
        if self._owns_ray:
            self._ray.shutdown()
