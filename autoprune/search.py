"""The search loop: config -> space -> ask -> plan -> trial (Ray) -> tell -> MLflow.

Everything the user can get wrong is checked before anything is written: the
factories, the model, the data, the space, the storage. Only then are the dense
model trained (once per study, reused on resume) and the study created.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import optuna
from torch import nn

from . import db, model_files
from .config import SearchConfig, config_changes
from .crashpoints import crash_point
from .drivers import Driver
from .errors import ConfigError, StorageError
from .execution import TrialPayload
from .inputs import Inputs, fingerprint
from .loop import ProgressCallback, loop, make_executor
from .report import StudyReport, model_source
from .retry import check_reachable, sqlite_file, store_lock
from .space import SearchSpace
from .storage import ensure_distinct_stores, open_storage, safe_snapshot, snapshot_digest
from .study import (
    ALLOCATIONS_ATTR,
    BASE_DIR_ATTR,
    BASELINE_ATTR,
    CONFIG_ATTR,
    DENSE_ATTR,
    INPUTS_ATTR,
    SEEDED_ATTR,
    UNIT_HIGH_ATTR,
    create_study,
    ensure_absent,
    load_study,
    make_sampler,
    record_config,
)
from .tracking import Tracker
from .trial import DenseBaseline, measure_dense, measure_finetuned_dense
from .workspace import Workspace

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger("autoprune")


def _dense_baseline(study: optuna.Study, dense: nn.Module, inputs: Inputs) -> DenseBaseline:
    stored = study.user_attrs.get(DENSE_ATTR)
    if stored:
        return DenseBaseline(**stored)
    baseline = measure_dense(dense, inputs.val_loader, inputs.settings)
    try:
        baseline = measure_finetuned_dense(dense, inputs.train_loader, inputs.val_loader, inputs.settings, baseline)
    except Exception as exc:  # the trials will meet (and record) the same problem; the study goes on
        log.warning("could not fine-tune the dense model for the accuracy reference (%s: %s); accuracy drops are "
                    "measured against the dense model as given", type(exc).__name__, str(exc).splitlines()[0]
                    if str(exc) else "")
    study.set_user_attr(DENSE_ATTR, asdict(baseline))
    crash_point("dense.measured")
    return baseline


def _enqueue_baselines(study: optuna.Study, config: SearchConfig, inputs: Inputs, dense: nn.Module) -> None:
    """The simple rules (``study.baseline_rules`` at ``study.baselines``) as the study's first trials.

    Only ``owl`` reads calibration batches: the context then holds ``space.calibration_batches`` training
    batches, taken as a trial takes them (:func:`~autoprune.trial.make_context`); other rules need none, and
    in the ``global`` parametrization neither does OWL here (its curve was made by :func:`_allocations`)."""
    from .baselines import seed_trials
    from .trial import make_context

    rules = config.study.baseline_rules
    calibrate = "owl" in rules and inputs.space.parametrization == "per_unit"
    context = make_context(inputs.train_loader if calibrate else (), inputs.settings,
                           next(iter(inputs.val_loader))[0][:1])
    for label, params in seed_trials(inputs.space, dense, context, rules, config.baseline_sparsities,
                                     config.space.methods,
                                     unstructured_sparsities=config.unstructured_baseline_sparsities,
                                     baseline_methods=config.study.baseline_methods):
        study.enqueue_trial(params, user_attrs={BASELINE_ATTR: label}, skip_if_exists=True)


def _allocations(config: SearchConfig, inputs: Inputs, dense: nn.Module) -> list[dict[str, object]]:
    """The rules' per-unit allocations on the dense model at whole-model sparsities every 0.025 over the
    space's range (and at the baseline sparsities exactly), for the ``global`` parametrization: a uniform
    rule per method of ``study.baseline_methods`` and, when ``study.baseline_rules`` lists it, OWL's, whose
    outlier ratios read ``space.calibration_batches`` training batches (as :func:`_enqueue_baselines` does)."""
    from .baselines import allocation_curves
    from .trial import make_context

    low, high = config.space.sparsity.low, config.space.sparsity.high
    grid = sorted({round(low + i * 0.025, 6) for i in range(int((high - low) / 0.025) + 1)}
                  | {low, high, *config.baseline_sparsities, *config.unstructured_baseline_sparsities})
    owl = "owl" in config.study.baseline_rules
    context = make_context(inputs.train_loader if owl else (), inputs.settings, next(iter(inputs.val_loader))[0][:1])
    curves = allocation_curves(inputs.space, dense, context, config.space.methods, grid,
                               baseline_methods=config.study.baseline_methods, owl=owl)
    if not curves:
        raise ConfigError("field 'space.parametrization': 'global' needs a rule that applies to the model "
                          "(uniform, global_magnitude, global_structured or owl); none did")
    return curves


def _sensitivity_highs(config: SearchConfig, space: SearchSpace) -> dict[str, float] | None:
    """Per-unit sparsity caps for a new study from ``<work_dir>/sensitivity.json``, when
    ``space.sensitivity_bounds`` asks for them; a missing or stale file is a config error."""
    if not config.space.sensitivity_bounds:
        return None
    from .errors import ConfigError
    from .sensitivity import read_bounds, unit_highs

    try:
        bounds, _ = read_bounds(config, space)
    except ValueError as exc:
        raise ConfigError(f"field 'space.sensitivity_bounds': {exc}") from None
    return unit_highs(bounds, config.space.sensitivity_margin)


def _enqueue_sensitivity(study: optuna.Study, space: SearchSpace, config: SearchConfig) -> None:
    """Seed a new study from ``<work_dir>/sensitivity.json`` (``autoprune sensitivity``), if there is one."""
    from .sensitivity import SENSITIVITY_ATTR, seed_trials

    if space.parametrization != "per_unit":  # its seeds are per-unit sparsities
        if (config.work_path / "sensitivity.json").is_file():
            log.info("sensitivity.json's seed trials are per-unit sparsities: not used with space.parametrization "
                     "%r (its bounds still cap each unit with space.sensitivity_bounds)", space.parametrization)
        return
    seeds = seed_trials(config, space)
    for label, params in seeds:
        study.enqueue_trial(params, user_attrs={BASELINE_ATTR: label}, skip_if_exists=True)
    if seeds:
        study.set_user_attr(SENSITIVITY_ATTR, [label for label, _ in seeds])


@dataclass(frozen=True)
class SearchSummary:
    study_name: str
    completed: int
    failed: int
    front: list[dict]
    parent_run_id: str
    dense: DenseBaseline
    recovered: list[int]
    notices: list[str]
    """What resume repaired (or could not) in the records a stopped driver left, one line each."""


def preflight(config: SearchConfig, db_url: str, *, resume: bool) -> None:
    """The checks that need no writes, made before anything is created: each store reachable (a short
    connect to a database server: seconds, not minutes of retries; a missing driver names its package),
    and on resume a SQLite study database that exists (opening a missing one would create it)."""
    for url, field in ((config.storage_url, "study.storage"), (db_url, "study.db_url"),
                       (config.tracking_uri, "tracking.uri")):
        check_reachable(url, field)
    path = sqlite_file(config.storage_url) if resume else None
    if path is not None and not path.is_file():
        raise StorageError(f"field 'study.storage': no study database at {path}, so no study "
                           f"{config.study.name!r} to resume; start it with 'autoprune run'")


def run_search(source: SearchConfig | Workspace, *, resume: bool = False,
               on_progress: ProgressCallback | None = None, allow_changes: Sequence[str] = ()) -> SearchSummary:
    """Run (or resume) the study of a config (or a :class:`Workspace`: a config with live model and data)
    until it holds ``study.n_trials`` finished trials.

    Other drivers may work on the same study at the same time (``autoprune resume`` with the same config,
    from another process or machine, on a shared PostgreSQL storage): together they run ``n_trials``.
    On resume, a config (or model, or data) that differs from the study's in what it searches is refused,
    naming the fields, unless ``allow_changes`` lists them (see :func:`~autoprune.config.config_changes`).
    """
    workspace = source if isinstance(source, Workspace) else Workspace(source)
    config = workspace.config
    inputs = workspace.inputs
    db_url = db.database_url(config)
    ensure_distinct_stores(config.storage_url, config.tracking_uri, db_url)
    highs = None if resume else _sensitivity_highs(config, inputs.space)  # checked before writing
    preflight(config, db_url, resume=resume)  # stores reachable; a resumed study's database exists
    study_file = sqlite_file(config.storage_url)
    if study_file is not None and not resume:
        study_file.parent.mkdir(parents=True, exist_ok=True)  # a new SQLite study database needs its directory
    with store_lock(config.storage_url):  # two searches started at once on a fresh work dir: one creates it
        storage = open_storage(config.storage_url)
    sampler = make_sampler(config.study.sampler, config.study.seed)
    snapshot = safe_snapshot(config.snapshot())  # passwords masked: stored in the study and logged to MLflow
    if resume:
        study: optuna.Study | None = load_study(storage, config.study.name, sampler)
        _check_unchanged(study, snapshot, fingerprint(inputs), allow_changes)
    else:
        ensure_absent(storage, config.study.name)
        study = None
    config.work_path.mkdir(parents=True, exist_ok=True)  # only now: a failed check above creates nothing
    db.prepare(db_url)
    tracker = workspace.tracker()
    dense = workspace.dense()
    if study is None:
        study = create_study(storage, config.study.name, sampler, snapshot, snapshot_digest(snapshot))
    if not study.user_attrs.get(SEEDED_ATTR):  # new, or its creator died before seeding it
        record_config(study, snapshot, snapshot_digest(snapshot))
        for key, value in ((BASE_DIR_ATTR, str(config.base_dir)), (INPUTS_ATTR, fingerprint(inputs))):
            if key not in study.user_attrs:
                study.set_user_attr(key, value)
        highs = highs if highs is not None else _sensitivity_highs(config, inputs.space)
        if highs and UNIT_HIGH_ATTR not in study.user_attrs:
            study.set_user_attr(UNIT_HIGH_ATTR, highs)
        if inputs.space.parametrization == "global" and ALLOCATIONS_ATTR not in study.user_attrs:
            study.set_user_attr(ALLOCATIONS_ATTR, _allocations(config, inputs, dense))
        inputs.space = workspace.study_space(study)
        _enqueue_sensitivity(study, inputs.space, config)
        _enqueue_baselines(study, config, inputs, dense)
        study.set_user_attr(SEEDED_ATTR, True)
        crash_point("study.seeded")
    # per-unit caps and allocations are decided once, when the study is created: a resume uses the stored ones
    inputs.space = workspace.study_space(study)
    driver = Driver(study).start()
    notices: list[str] = []
    try:
        recovered = driver.recover_stale() if resume else []
        baseline = _dense_baseline(study, dense, inputs)
        parent_id = tracker.start_parent(config.study.name, snapshot, asdict(baseline))
        db.record_search(db_url, study_name=config.study.name, storage_url=config.storage_url, snapshot=snapshot,
                         dense_checkpoint=workspace.dense_checkpoint(), experiment_id=tracker.experiment_id,
                         parent_run_id=parent_id)
        crash_point("registry.recorded")
        report = StudyReport(tracker, parent_id, config.study.name, baseline, space=inputs.space,
                             models=model_source(workspace))
        if not driver.others_alive():  # a live driver logs its own trials; don't race it
            notices += repair_records(study, tracker, parent_id, workspace)
            report.log_missing(study, inputs.space)
        payload = TrialPayload(dense, inputs.train_loader, inputs.val_loader, inputs.settings, baseline,
                               threads=max(1, int(config.execution.cpus_per_trial)))
        executor = make_executor(config, payload, inputs.modules)
        status, storage_lost = "FAILED", False
        try:
            loop(workspace, study, inputs.space, executor, report, on_progress, driver)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except StorageError:
            storage_lost = True
            raise
        finally:
            executor.shutdown()
            rows = [] if storage_lost else report.finalize(study)
            report.finish(status)
    finally:
        driver.stop()
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return SearchSummary(config.study.name, states.count(optuna.trial.TrialState.COMPLETE),
                         states.count(optuna.trial.TrialState.FAIL), rows, parent_id, baseline, recovered,
                         notices)


def _check_unchanged(study: optuna.Study, snapshot: Mapping[str, object], inputs: Mapping[str, object],
                     allowed: Sequence[str]) -> None:
    """Refuse to resume with a config, model or data that search something else than the study did."""
    stored = study.user_attrs.get(CONFIG_ATTR)
    changes = config_changes(stored, snapshot, allowed) if stored else []
    old_inputs = study.user_attrs.get(INPUTS_ATTR)
    if old_inputs:  # objects given to autoprune.Search have no factory name in the config
        changes += config_changes({"inputs": old_inputs}, {"inputs": dict(inputs)}, allowed)
    if changes:
        shown = ", ".join(changes[:12]) + (f" and {len(changes) - 12} more" if len(changes) > 12 else "")
        raise ConfigError(f"study {study.study_name!r} was made with another search than this config, model or "
                          f"data describe; changed: {shown}. Resume with the study's settings (its config is in "
                          f"the MLflow parent run's config.json), or allow them: --allow-changes "
                          f"{','.join(changes)}")


def repair_records(study: optuna.Study, tracker: Tracker, parent_id: str, workspace: Workspace) -> list[str]:
    """Repair what a driver killed at any instant can leave half-done in MLflow and the work dir, before
    the missing records are logged again; one line per repair, for the user.

    Optuna's side is repaired by :meth:`Driver.recover_stale` (trials left RUNNING, also those cut short
    while being asked for). Only called while no other driver of the study is alive.
    """
    lines = []
    dropped = tracker.drop_unfinished_trial_runs(parent_id)
    if dropped:
        lines.append(f"dropped {len(dropped)} MLflow trial run(s) a stopped driver left half-written; "
                     "they are logged again")
    trials = study.get_trials(deepcopy=False)
    orphans = tracker.drop_trial_runs_except(t.number for t in trials if t.state.is_finished())
    if orphans:
        lines.append(f"deleted the MLflow runs of trials {orphans}, which study {study.study_name!r} does not have")
    models = tracker.drop_unlinked_models(study.study_name)
    if models:
        lines.append(f"deleted {len(models)} MLflow model(s) a stopped driver left half-logged; they are logged again")
    missing = [t.number for t in trials if t.state == optuna.trial.TrialState.COMPLETE
               and not model_files.has_model_files(workspace.trial_dir(t.number), both=True)]
    if missing:
        lines.append(f"complete trials {missing} have no model files under {workspace.config.study_path / 'trials'}: "
                     "they get no MLflow model and cannot be exported")
    return lines


