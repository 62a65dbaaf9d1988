"""The ask -> execute -> tell loop of one driver: asks Optuna for trials while fewer than ``execution.parallel``
run, hands each plan to the executor (Ray, or this process), and records every outcome: the trial's model
files, Optuna's tell, MLflow. Stops when the study's finished and running trials (of every driver) fill
``study.n_trials``; with nothing of its own in flight it waits for other drivers' trials, or takes over
those of a driver that is gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import optuna

from . import model_files, pareto
from .config import SearchConfig
from .crashpoints import crash_point
from .drivers import Driver
from .execution import Executor, InProcessExecutor, RayExecutor, TrialPayload
from .plan import Plan, TrialFailure
from .report import StudyReport
from .space import SearchSpace
from .study import (
    SEMI_STRUCTURED_ATTR,
    WORKER_ATTR,
    constraint_values,
    counted_trials,
    screening_rivals,
    tell_failure,
    tell_success,
)
from .trial import TrialOutput
from .workspace import Workspace

POLL_S = 2.0
"""How often a driver with nothing in flight looks again at trials other drivers are running."""


@dataclass(frozen=True)
class Progress:
    """A snapshot for progress displays."""

    target: int
    done: int
    failed: int
    running: int
    front_size: int
    message: str = ""


ProgressCallback = Callable[[Progress], None]


def make_executor(config: SearchConfig, payload: TrialPayload, modules: list[ModuleType]) -> Executor:
    execution = config.execution
    if execution.backend == "in_process":
        return InProcessExecutor(payload, debug=execution.debug)
    return RayExecutor(payload, address=execution.address, parallel=execution.parallel,
                       cpus_per_trial=execution.cpus_per_trial, gpus_per_trial=execution.gpus_per_trial,
                       memory_per_trial_mb=execution.memory_per_trial_mb,
                       max_retries=execution.max_retries, modules=modules)


def _store_files(workspace: Workspace, number: int, output: TrialOutput) -> Path:
    directory = workspace.trial_dir(number)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / model_files.WEIGHTS_FILE).write_bytes(output.weights)
    (directory / model_files.SKELETON_FILE).write_bytes(output.skeleton)
    return directory


def loop(workspace: Workspace, study: optuna.Study, space: SearchSpace, executor: Executor,
          report: StudyReport, on_progress: ProgressCallback | None, driver: Driver) -> None:
    config = workspace.config
    target, parallel = config.study.n_trials, config.execution.parallel
    distributions = space.distributions()
    screening = config.finetune.screening
    halving = screening.enabled and screening.max_dominated is not None  # trials compare with earlier ones
    inflight: dict[int, tuple[optuna.Trial, Plan]] = {}
    failed = 0
    front_size = len(study.best_trials) if pareto.complete_trials(study) else 0

    def progress(message: str = "") -> None:
        if on_progress:
            on_progress(Progress(target, counted_trials(study), failed, executor.running, front_size, message))

    progress("starting")
    while True:
        while executor.running < parallel:
            trial = driver.ask(distributions, target)  # None: finished + running trials (all drivers) fill it
            if trial is None:
                break
            plan = space.decode(trial.params)
            inflight[trial.number] = (trial, plan)
            executor.submit(trial.number, plan, screening_rivals(study) if halving else ())
            crash_point("trial.submitted")
        if executor.running == 0:
            if counted_trials(study) >= target:
                progress()
                break
            # The rest of the budget is held by other drivers' running trials: wait for them, or take over
            # those of a driver that is gone.
            recovered = driver.recover_stale()
            if recovered:
                progress(f"re-enqueued trials left running by a stopped driver: {recovered}")
            elif driver.others_running() == 0:
                break
            else:
                time.sleep(POLL_S)
            continue
        for number, outcome in executor.wait():
            trial, plan = inflight.pop(number)
            where = executor.placements.pop(number, None)
            attrs = {WORKER_ATTR: where} if where else {}
            if isinstance(outcome, TrialFailure):
                if not tell_failure(study, trial, outcome, attrs):
                    continue  # another driver took the trial over as stale; its copy runs instead
                failed += 1
                front_size = report.trial_finished(study, number, plan, {**trial.user_attrs, **attrs}, None, outcome)
                message = f"trial {number} failed ({outcome.kind}): {outcome.reason.splitlines()[-1][:120]}"
            else:
                _store_files(workspace, number, outcome)  # before tell: a COMPLETE trial always has its model
                # the files' sha256, kept in the study: only these files are ever unpickled (export, report)
                attrs[model_files.FILES_ATTR] = model_files.digests(outcome.weights, outcome.skeleton)
                if outcome.semi_structured:  # {layer: "N:M"}: reaches the MLflow run through the trial's attrs
                    attrs[SEMI_STRUCTURED_ATTR] = dict(outcome.semi_structured)
                crash_point("trial.files_saved")
                over = constraint_values(outcome.result, report.baseline.size_bytes, report.baseline.latency_ms,
                                         config.space.constraints.model_dump())  # <= 0: within space.constraints
                if not tell_success(study, trial, outcome.result, attrs, over):
                    continue
                front_size = report.trial_finished(study, number, plan, {**trial.user_attrs, **attrs}, outcome.result,
                                                   None)
                r = outcome.result
                message = (f"trial {number}: {report.baseline.metric} {r.accuracy:.4f}, size {r.size_bytes:,} B, "
                           f"latency {r.latency_ms:.3f} ms")
            progress(message)
