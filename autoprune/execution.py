"""Where trials run: on Ray (local or an existing cluster) or in-process.

The only module that imports Ray. Both executors take the same inputs and give
back, per trial number, either a :class:`~autoprune.trial.TrialOutput` or a
:class:`~autoprune.plan.TrialFailure` (its kind, reason and traceback), so the
search loop does not care where trials ran. The dense
model, the data and the settings are put in Ray's object store once.

On a cluster (``execution.address``) each trial asks Ray for
``cpus_per_trial`` CPUs, ``gpus_per_trial`` GPUs and ``memory_per_trial_mb``
of memory; the user's factory modules travel to every node through the job's
``runtime_env`` (``py_modules``). A worker that dies mid-trial (killed, out of
memory, node lost) is retried by Ray up to ``max_retries`` times; a trial that
raises is not retried. Each result says where it ran (:attr:`placements`: node, pid, ``device`` and
``gpu_name``).

GPUs: ``gpus_per_trial`` may be a fraction (0.25: four trials share one GPU). Ray sets each task's
``CUDA_VISIBLE_DEVICES`` to the GPU it assigned, so a trial's ``cuda`` is that GPU; ``execution.device:
auto`` uses it when Ray assigned one (``ray.get_gpu_ids()``). After each trial the CUDA caching allocator
is emptied, so the next trial on that worker (or a neighbour sharing the GPU) gets the memory back; a CUDA
out-of-memory error fails that trial only (kind ``out_of_memory``) and the search goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn

from .errors import UnsupportedLayerError
from .plan import Plan, TrialFailure, bounded_traceback
from .trial import Batches, DenseBaseline, TrialOutput, TrialSettings, run_trial, trial_device

Outcome = TrialOutput | TrialFailure
Rivals = tuple[tuple[float, int], ...]
"""(screened accuracy, non-zero parameters) of earlier trials, for screening by domination."""

log = logging.getLogger("autoprune")


@dataclass(frozen=True)
class TrialPayload:
    """What every trial of a study shares; shipped to workers once."""

    dense: nn.Module
    train_loader: Batches
    val_loader: Batches
    settings: TrialSettings
    baseline: DenseBaseline
    threads: int = 1


def execute(payload: TrialPayload, plan: Plan, *, gpu_assigned: bool | None = None,
            rivals: Rivals = ()) -> TrialOutput:
    """Run one trial with the payload's settings (this is what a worker calls); ``gpu_assigned``: whether Ray
    gave this task a GPU (None: ``gpus_per_trial > 0``), for ``execution.device: auto``; ``rivals``: the
    screening results of earlier trials (:class:`~autoprune.trial.Screening`), when the search screens."""
    previous = torch.get_num_threads()
    torch.set_num_threads(payload.threads)
    settings = payload.settings
    if rivals and settings.screening is not None:
        settings = replace(settings, screening=replace(settings.screening, rivals=tuple(rivals)))
    try:
        device = trial_device(settings, gpu_assigned)
        settings = replace(settings, device=device.type)
        return run_trial(payload.dense, payload.train_loader, payload.val_loader, plan, settings, payload.baseline)
    finally:
        torch.set_num_threads(previous)
        if settings.device == "cuda":
            torch.cuda.empty_cache()  # the memory goes back to the GPU for the next trial, failed or not


def device_info(settings: TrialSettings, gpu_assigned: bool | None = None) -> dict[str, str]:
    """Where a trial with ``settings`` runs, for its placement record: ``device`` and ``gpu_name``."""
    try:
        device = trial_device(settings, gpu_assigned)
    except Exception:  # the trial itself fails with the reason
        return {"device": f"{settings.device} (unavailable)"}
    if device.type != "cuda":
        return {"device": "cpu"}
    return {"device": "cuda", "gpu_name": torch.cuda.get_device_name(device)}


def failure_reason(exc: BaseException) -> str:
    """A readable, bounded description of why a trial failed."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text[-2000:]


def failure_kind(exc: BaseException) -> str:
    """The :data:`~autoprune.plan.FAILURE_KINDS` entry of an exception a trial raised (its causes included)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.OutOfMemoryError | MemoryError):  # CUDA's OOM is torch.OutOfMemoryError
            return "out_of_memory"
        if isinstance(current, UnsupportedLayerError):
            return "unsupported_layer"
        current = current.__cause__ or current.__context__
    return "user_code"


def trial_failure(exc: BaseException, text: str | None = None) -> TrialFailure:
    """The failure of a trial that raised ``exc``; ``text``: its traceback if not ``exc``'s own (a remote one)."""
    if text is None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return TrialFailure(failure_kind(exc), failure_reason(exc), bounded_traceback(text.strip()))


class Executor(Protocol):
    placements: dict[int, dict[str, Any]]
    """Where each finished trial ran (``node_id``, ``worker_pid``, ``modules``), by trial number."""

    def submit(self, number: int, plan: Plan, rivals: Rivals = ()) -> None: ...

    def wait(self) -> list[tuple[int, Outcome]]:
        """Block until at least one submitted trial ends; return those that ended."""

    @property
    def running(self) -> int: ...

    def shutdown(self) -> None: ...


class InProcessExecutor:
    """Runs trials one at a time in this process: for debugging and small tests.

    With ``debug`` the first exception a trial raises propagates (with its traceback) instead of
    failing the trial; the trial is left running, as after Ctrl-C (``resume`` runs it again).
    """

    def __init__(self, payload: TrialPayload, *, debug: bool = False) -> None:
        self._payload = payload
        self._debug = debug
        self._queue: list[tuple[int, Plan, Rivals]] = []
        self.placements: dict[int, dict[str, Any]] = {}

    def submit(self, number: int, plan: Plan, rivals: Rivals = ()) -> None:
        self._queue.append((number, plan, rivals))

    def wait(self) -> list[tuple[int, Outcome]]:
        number, plan, rivals = self._queue.pop(0)
        self.placements[number] = {"node_id": "in-process", "worker_pid": os.getpid(),
                                   **device_info(self._payload.settings)}
        try:
            return [(number, execute(self._payload, plan, rivals=rivals))]
        except Exception as exc:
            if not self._debug:
                return [(number, trial_failure(exc))]
            with contextlib.suppress(AttributeError, TypeError):
                exc.autoprune_trial = number  # type: ignore[attr-defined]  # the CLI lets it through, traceback and all
                exc.add_note(f"(raised by trial {number} in 'autoprune --debug'; the trial is left unfinished: "
                             "'autoprune resume' runs it again)")
            raise

    @property
    def running(self) -> int:
        return len(self._queue)

    def shutdown(self) -> None:
        self._queue.clear()


WORKER_SETUP_HOOK = "autoprune.worker_setup.quiet_import_warnings"
"""Ray's ``worker_process_setup_hook`` for the jobs a search starts (:mod:`autoprune.worker_setup`)."""


def _ray_trial(payload: TrialPayload, plan: Plan, module_names: tuple[str, ...],
               rivals: Rivals = ()) -> tuple[TrialOutput, dict]:
    """The Ray task: run the trial and say where it ran (the trial itself stays torch-only)."""
    import ray

    gpu_assigned = bool(ray.get_gpu_ids())  # Ray's assignment; CUDA_VISIBLE_DEVICES shows only that GPU
    where = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "worker_pid": os.getpid(),
        "modules": {name: getattr(sys.modules.get(name), "__file__", None) for name in module_names},
        **device_info(payload.settings, gpu_assigned),
    }
    return execute(payload, plan, gpu_assigned=gpu_assigned, rivals=rivals), where


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
        self.placements: dict[int, dict[str, Any]] = {}
        self._module_names = tuple(m.__name__ for m in modules)
        self._max_retries = max_retries
        runtime_env: dict[str, Any] = {}
        if modules:
            runtime_env["py_modules"] = list(modules)
        init_kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": True,
            "configure_logging": True,
            "logging_level": "WARNING",
            # job level only (Ray takes no setup hook per task): each worker quiets import noise as it starts
            "runtime_env": {**runtime_env, "worker_process_setup_hook": WORKER_SETUP_HOOK},
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
        # Worker deaths are retried up to max_retries; exceptions raised by the trial are not.
        options: dict[str, Any] = {"num_cpus": cpus_per_trial, "max_retries": max_retries,
                                   "retry_exceptions": False}
        if gpus_per_trial:
            options["num_gpus"] = gpus_per_trial
        if memory_per_trial_mb:
            options["memory"] = memory_per_trial_mb * 1024 * 1024
        if not self._owns_ray and runtime_env:
            options["runtime_env"] = runtime_env  # Ray was started by the caller, without our modules
        self._check_resources(options, address)
        self._remote = ray.remote(_ray_trial).options(**options)
        self._payload_ref = ray.put(payload)
        self._pending: dict[Any, int] = {}

    def _check_resources(self, options: dict[str, Any], address: str | None) -> None:
        """Warn when no node of the cluster could ever run one trial (the task would wait forever)."""
        wanted = {"CPU": options["num_cpus"], "GPU": options.get("num_gpus", 0),
                  "memory": options.get("memory", 0)}
        try:
            nodes = [n.get("Resources", {}) for n in self._ray.nodes() if n.get("Alive")]
        except Exception:
            return
        if nodes and not any(all(res.get(k, 0) >= v for k, v in wanted.items() if v) for res in nodes):
            log.warning("no node of the Ray cluster %s has the resources of one trial (%s); trials wait "
                        "until one joins (execution.cpus_per_trial / gpus_per_trial / memory_per_trial_mb)",
                        address or "(local)", {k: v for k, v in wanted.items() if v})

    def submit(self, number: int, plan: Plan, rivals: Rivals = ()) -> None:
        ref = self._remote.remote(self._payload_ref, plan, self._module_names, rivals)
        self._pending[ref] = number

    def wait(self) -> list[tuple[int, Outcome]]:
        ready, _ = self._ray.wait(list(self._pending), num_returns=1)
        finished: list[tuple[int, Outcome]] = []
        for ref in ready:
            number = self._pending.pop(ref)
            try:
                output, where = self._ray.get(ref)
                self.placements[number] = where
                finished.append((number, output))
            except self._ray.exceptions.RayTaskError as exc:  # the trial raised; str(exc): the remote traceback
                finished.append((number, trial_failure(exc.cause if exc.cause else exc, str(exc))))
            except self._ray.exceptions.RayError as exc:  # worker or node died, also after every retry
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                kind = "out_of_memory" if isinstance(exc, self._ray.exceptions.OutOfMemoryError) else "worker_lost"
                reason = f"{type(exc).__name__}: {text} (attempts: {1 + self._max_retries})"
                finished.append((number, TrialFailure(kind, reason, bounded_traceback(str(exc).strip()))))
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
