"""The Optuna study: storage, sampler, directions, and crash recovery.

The only module that creates or loads studies. Objectives are fixed:
accuracy (maximize), size on disk in bytes (minimize), latency in ms (minimize).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.samplers import BaseSampler
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from .errors import StorageError
from .plan import TrialResult

OBJECTIVES = ("accuracy", "size_bytes", "latency_ms")
DIRECTIONS = ("maximize", "minimize", "minimize")

CONFIG_ATTR = "autoprune.config"
DIGEST_ATTR = "autoprune.config_digest"
DENSE_ATTR = "autoprune.dense"
REASON_ATTR = "fail_reason"
STALE_ATTR = "autoprune.stale"
BASELINE_ATTR = "autoprune.baseline"


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split(":", 1)[0] + ":..."


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


def open_storage(url: str) -> RDBStorage:
    """Open (and create tables in) the Optuna RDB storage at ``url``."""
    try:
        return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = reason.replace(url, safe_url(url))
        raise StorageError(f"field 'study.storage': cannot open {safe_url(url)}: {reason}") from None


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
    """A new study with the config snapshot stored in its user attributes."""
    ensure_absent(storage, name)
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, directions=list(DIRECTIONS))
    study.set_user_attr(CONFIG_ATTR, dict(snapshot))
    study.set_user_attr(DIGEST_ATTR, digest)
    return study


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


def recover_stale_trials(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a driver that died: mark them FAIL and re-enqueue their params.

    Returns the numbers of the trials marked. Only call this when no other
    driver is working on the study.
    """
    storage = study._storage
    marked = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, "driver stopped before the trial finished")
        storage.set_trial_user_attr(trial._trial_id, STALE_ATTR, True)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs=_retry_attrs(trial), skip_if_exists=False)
        marked.append(trial.number)
    return marked


def _retry_attrs(trial: FrozenTrial) -> dict[str, Any]:
    attrs = {k: v for k, v in trial.user_attrs.items() if k == BASELINE_ATTR}
    attrs["autoprune.retry_of"] = trial.number
    return attrs


def counted_trials(study: optuna.Study) -> int:
    """Trials that count toward ``n_trials``: finished ones, except those a dead driver left."""
    return sum(
        1 for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and not t.user_attrs.get(STALE_ATTR))
    )


def tell_success(study: optuna.Study, trial: optuna.Trial, result: TrialResult) -> None:
    for key, value in result.as_metrics().items():
        trial.set_user_attr(key, value)
    study.tell(trial, [result.accuracy, float(result.size_bytes), result.latency_ms])


def tell_failure(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr(REASON_ATTR, reason[-4000:])
    study.tell(trial, state=TrialState.FAIL)


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto-optimal complete trials, by trial number."""
    return sorted(study.best_trials, key=lambda t: t.number)
