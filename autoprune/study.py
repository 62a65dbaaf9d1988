"""The Optuna study: objectives, sampler, create / load, what a trial's record holds, and telling results.

The only module that creates or loads studies. Objectives are fixed: accuracy (maximize; with
``model.task: causal_lm`` perplexity, minimize), size on disk in bytes (minimize), latency in ms (minimize).
Storage (with reconnects) lives in :mod:`autoprune.storage`; several drivers on one study, and crash recovery,
in :mod:`autoprune.drivers`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.samplers import BaseSampler
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from .crashpoints import crash_point
from .errors import StorageError
from .plan import TrialFailure, TrialResult
from .retry import safe_url
from .storage import safe_snapshot

log = logging.getLogger("autoprune")

OBJECTIVES = ("accuracy", "size_bytes", "latency_ms")
DIRECTIONS = ("maximize", "minimize", "minimize")
OBJECTIVE_ATTR = "autoprune.objective"
"""Study user attribute ``{"name", "direction"}`` of the first objective (``model.task: causal_lm``: perplexity,
minimized); on each trial of such a study, the name (:mod:`autoprune.pareto` turns it into 'higher is better')."""


def first_objective(snapshot: Mapping[str, Any]) -> tuple[str, str]:
    """(name, direction) of the first objective for a config snapshot: the direction follows the metric."""
    task = (snapshot.get("model") or {}).get("task", "classification")
    return ("perplexity", "minimize") if task == "causal_lm" else ("accuracy", "maximize")

CONFIG_ATTR = "autoprune.config"
DIGEST_ATTR = "autoprune.config_digest"
DENSE_ATTR = "autoprune.dense"
REASON_ATTR = "fail_reason"
FAILURE_KIND_ATTR = "autoprune.failure_kind"  # TrialFailure.kind: user_code, out_of_memory, worker_lost, ...
TRACEBACK_ATTR = "autoprune.traceback"  # the failed trial's full traceback (bounded)
STALE_ATTR = "autoprune.stale"
BASELINE_ATTR = "autoprune.baseline"
EXTRA_ATTR = "autoprune.extra"
UNIT_HIGH_ATTR = "autoprune.unit_high"
ALLOCATIONS_ATTR = "autoprune.allocations"
"""The rules' per-unit allocations on the dense model, for ``space.parametrization: global``."""
BASE_DIR_ATTR = "autoprune.base_dir"
"""Study user attribute: the directory the config's relative paths are relative to (for ``load_search``)."""
INPUTS_ATTR = "autoprune.inputs"
"""Study user attribute: the model's and data's fingerprint (``inputs.fingerprint``), compared on resume."""
SEEDED_ATTR = "autoprune.seeded"
"""Study user attribute: the study's records and seed trials are all stored (a crash may come before)."""
RETRY_OF_ATTR = "autoprune.retry_of"
DRIVER_ATTR = "autoprune.driver"
"""Trial user attribute: the id of the driver that asked for the trial."""
WORKER_ATTR = "autoprune.worker"
"""Trial user attribute: where the trial ran (Ray node id, worker pid, shipped modules)."""
SEMI_STRUCTURED_ATTR = "autoprune.semi_structured"
"""Trial user attribute ``{layer: "N:M"}``: the layers an N:M method pruned (``TrialOutput.semi_structured``);
set only on trials that have such layers."""
DRIVER_PREFIX = "autoprune.driver."
"""Study user attributes ``autoprune.driver.<id>``: each driver's identity and heartbeat."""

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
    metric, direction = first_objective(snapshot)
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                directions=[direction, *DIRECTIONS[1:]])
    with warnings.catch_warnings():  # experimental in Optuna 5; other clients (optuna-dashboard) show the names
        warnings.simplefilter("ignore")
        study.set_metric_names([metric, *OBJECTIVES[1:]])
    study.set_user_attr(OBJECTIVE_ATTR, {"name": metric, "direction": direction})
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
    first = (study.user_attrs.get(OBJECTIVE_ATTR) or {}).get("direction", "maximize")
    expected = [StudyDirection[first.upper()], StudyDirection.MINIMIZE, StudyDirection.MINIMIZE]
    if list(study.directions) != expected:
        raise StorageError(f"study {name!r} has directions {[d.name for d in study.directions]}, "
                           f"expected {[d.name for d in expected]}: it was not made by autoprune")
    return study


# ---------------------------------------------------------------- counting
def _counted(t: FrozenTrial) -> bool:
    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get(STALE_ATTR))


def counted_trials(study: optuna.Study) -> int:
    """Trials that count toward ``n_trials``: finished ones, except those a dead driver left."""
    return sum(1 for t in study.get_trials(deepcopy=False) if _counted(t))


# ---------------------------------------------------------------- results
def _set_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def constraint_values(result: TrialResult, dense_size: float, dense_latency: float,
                      limits: Mapping[str, float | None]) -> dict[str, float]:
    """The trial's value for each set limit of ``space.constraints`` (``max_accuracy_drop``,
    ``max_size_fraction``, ``max_latency_fraction``), as Optuna wants them: how far over the limit,
    ``<= 0`` feasible. Keys drop the ``max_`` prefix (``accuracy_drop``, ``size_fraction``, ...)."""
    measured = {"max_accuracy_drop": result.accuracy_drop,
                "max_size_fraction": result.size_bytes / dense_size if dense_size else float("inf"),
                "max_latency_fraction": result.latency_ms / dense_latency if dense_latency else float("inf")}
    return {name.removeprefix("max_"): float(measured[name] - limit)
            for name, limit in limits.items() if limit is not None}


def tell_success(study: optuna.Study, trial: optuna.Trial, result: TrialResult,
                 attrs: Mapping[str, Any] | None = None, constraints: Mapping[str, float] | None = None) -> bool:
    """Record a complete trial, with its ``constraints`` (:func:`constraint_values`: Optuna's
    ``Trial.set_constraint``, seen by the samplers and by ``best_trials``); False if another driver had
    already marked it stale (result dropped)."""
    try:
        minimized = {OBJECTIVE_ATTR: "perplexity"} if study.directions[0] == StudyDirection.MINIMIZE else {}
        _set_attrs(trial, {**result.as_metrics(), EXTRA_ATTR: dict(result.extra), **minimized, **(attrs or {})})
        for key, value in (constraints or {}).items():
            trial.set_constraint(key, value)
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


def tell_failure(study: optuna.Study, trial: optuna.Trial, failure: TrialFailure | str,
                 attrs: Mapping[str, Any] | None = None) -> bool:
    """Record a failed trial with its reason (and, for a :class:`TrialFailure`, its kind and traceback);
    False if another driver had already marked it stale."""
    if isinstance(failure, str):
        failure = TrialFailure("user_code", failure)
    kept = {REASON_ATTR: failure.reason[-4000:], FAILURE_KIND_ATTR: failure.kind}
    if failure.traceback:
        kept[TRACEBACK_ATTR] = failure.traceback
    try:
        _set_attrs(trial, {**kept, **(attrs or {})})
        study.tell(trial, state=TrialState.FAIL)
    except (UpdateFinishedTrialError, ValueError):
        if not _taken_over(study, trial):
            raise
        return False
    return True


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto-optimal complete trials, by trial number."""
    return sorted(study.best_trials, key=lambda t: t.number)


def screening_rivals(study: optuna.Study) -> tuple[tuple[float, int], ...]:
    """(screened accuracy, non-zero parameters) of the study's complete trials that were screened after a
    short fine-tuning (``finetune.screening.max_dominated``): what a new trial's screening compares with."""
    rivals = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        extra = trial.user_attrs.get(EXTRA_ATTR) or {}
        if "screened_nonzero" in extra and "screened_accuracy" in extra:
            rivals.append((float(extra["screened_accuracy"]), int(extra["screened_nonzero"])))
    return tuple(rivals)
