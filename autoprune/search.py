"""The search loop: config -> space -> ask -> plan -> trial (Ray) -> tell -> MLflow.

Everything the user can get wrong is checked before anything is written: the
factories, the model, the data, the space, the storage. Only then are the dense
model trained (once per study, reused on resume) and the study created.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType

import optuna
import torch
from torch import nn

from . import db, model_files, pareto
from .config import SearchConfig
from .crashpoints import crash_point
from .errors import StorageError
from .execution import Executor, InProcessExecutor, RayExecutor, TrialPayload
from .methods import PruneContext
from .model_io import build_loaders, build_model, import_factory, load_checkpoint
from .plan import Plan
from .report import StudyReport, model_source
from .retry import check_reachable, sqlite_file, store_lock
from .space import SearchSpace, find_head
from .study import (
    BASELINE_ATTR,
    DENSE_ATTR,
    SEEDED_ATTR,
    UNIT_HIGH_ATTR,
    WORKER_ATTR,
    Driver,
    counted_trials,
    create_study,
    ensure_absent,
    ensure_distinct_stores,
    load_study,
    make_sampler,
    open_storage,
    record_config,
    safe_snapshot,
    snapshot_digest,
    tell_failure,
    tell_success,
)
from .tracking import Tracker
from .training import TrainSettings, train
from .trial import Batches, DenseBaseline, TrialOutput, TrialSettings, measure_dense

optuna.logging.set_verbosity(optuna.logging.WARNING)

DENSE_FILE = "dense.pt"
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


@dataclass
class Inputs:
    """The user's model, data and search space, built and checked from the config."""

    model: nn.Module
    train_loader: Batches
    val_loader: Batches
    space: SearchSpace
    settings: TrialSettings
    modules: list[ModuleType]


def _user_module(module: ModuleType) -> bool:
    """A module shipped to Ray workers: one that is not an installed package."""
    path = getattr(module, "__file__", None) or ""
    return "site-packages" not in path and "dist-packages" not in path


def build_inputs(config: SearchConfig) -> Inputs:
    """Import factories, build model and data, derive the search space; no side effects on disk."""
    model_factory, model_module = import_factory(config.model.factory, config.base_dir, "model.factory")
    data_factory, data_module = import_factory(config.data.factory, config.base_dir, "data.factory")
    task = {key: import_factory(spec, config.base_dir, f"model.{key}")
            for key in ("loss", "metric") if (spec := getattr(config.model, key)) is not None}
    torch.manual_seed(config.study.seed)  # the same initial weights in every process, so pre-training repeats
    model = build_model(model_factory, config.model.kwargs, "model.factory")
    train_loader, val_loader = build_loaders(data_factory, config.data.kwargs, "data.factory")
    if config.checkpoint_path is not None:
        load_checkpoint(model, config.checkpoint_path)
    check_task(model, train_loader, val_loader, task.get("loss", (None,))[0], task.get("metric", (None,))[0])
    head = config.space.head or find_head(model)
    if head not in dict(model.named_modules()):
        from .errors import ConfigError

        raise ConfigError(f"field 'space.head': no module named {head!r} in the model")
    rewind_state = _rewind_checkpoint_state(config, model)
    settings = TrialSettings(
        finetune=TrainSettings(**config.finetune.model_dump(), loss_fn=task["loss"][0] if "loss" in task else None),
        protected=frozenset({head}),
        latency_batch=config.latency.batch_size,
        latency_threads=config.latency.threads,
        latency_rounds=config.latency.rounds,
        latency_min_run_time=config.latency.min_run_time,
        max_layer_sparsity=config.space.max_layer_sparsity,
        round_to=config.space.round_to,
        calibration_batches=config.space.calibration_batches,
        seed=config.study.seed,
        rewind_state=rewind_state,
        metric_fn=task["metric"][0] if "metric" in task else None,
    )
    example = next(iter(val_loader))[0][:1]
    context = PruneContext(example_inputs=example, protected=settings.protected,
                           max_layer_sparsity=settings.max_layer_sparsity, round_to=settings.round_to)
    sparsity = config.space.sparsity
    space = SearchSpace.from_model(model, context, config.space.methods, config.space.include,
                                   config.space.exclude, low=sparsity.low, high=sparsity.high,
                                   step=sparsity.step, quantize=config.space.quantize,
                                   schedules=tuple(config.space.schedules),
                                   iterative_rounds=config.space.iterative_rounds, rewind=config.space.rewind)
    candidates = (model_module, data_module, *(module for _, module in task.values()))
    modules = list({m.__name__: m for m in candidates if _user_module(m)}.values())
    return Inputs(model, train_loader, val_loader, space, settings, modules)


def _shape(value: object) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def check_task(model: nn.Module, train_loader: Batches, val_loader: Batches,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
               metric_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> None:
    """Run the model on one validation and one training batch and compute the loss (``model.loss``,
    default cross-entropy) and the metric (``model.metric``, default top-1) on its outputs, so that a
    model whose outputs do not fit the data's targets (5 classes for 10 labels, no batch dimension)
    is a :class:`ConfigError` naming both factories and the shapes, before anything is trained or
    written. The random number generator's state and the model's training flag are left as they were."""
    from .errors import ConfigError
    from .measure import top1

    loss_name = "model.loss" if loss_fn is not None else "the default loss (cross-entropy)"
    metric_name = "model.metric" if metric_fn is not None else "the default metric (top-1 accuracy)"
    was_training = model.training
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model.eval()
        try:
            for which, loader in (("validation", val_loader), ("training", train_loader)):
                inputs, targets = next(iter(loader))
                given = f"a {which} batch of data.factory (inputs {_shape(inputs)}, targets {_shape(targets)})"
                try:
                    outputs = model(inputs)
                except Exception as exc:
                    raise ConfigError(f"field 'model.factory': the model fails on {given}: "
                                      f"{type(exc).__name__}: {_first_line(exc)}") from None
                batch = inputs.shape[0] if inputs.dim() else 0
                tensor_out = isinstance(outputs, torch.Tensor) and outputs.dim() > 0
                if not tensor_out and (loss_fn is None or metric_fn is None):  # the defaults need [batch, ...]
                    raise ConfigError(f"field 'model.factory': expected the model to return a tensor with a batch "
                                      f"dimension, got {_shape(outputs)} on {given}")
                if tensor_out and (outputs.shape[0] != batch or (targets.dim() and targets.shape[0] != batch)):
                    raise ConfigError(f"field 'model.factory': expected outputs and targets with the batch "
                                      f"dimension first ({batch}), got outputs {_shape(outputs)} on {given}")
                if tensor_out and loss_fn is None and not targets.is_floating_point() and targets.numel():
                    classes = outputs.shape[1] if outputs.dim() > 1 else 0
                    if int(targets.max()) >= classes or int(targets.min()) < 0:
                        raise ConfigError(
                            f"field 'model.factory': the model's outputs {_shape(outputs)} give {classes} classes, "
                            f"but {given} holds class labels from {int(targets.min())} to {int(targets.max())} "
                            f"(the default loss, cross-entropy, needs outputs [batch, classes]); fix the model's "
                            f"output size, or set model.loss and model.metric")
                try:
                    loss = (loss_fn or nn.functional.cross_entropy)(outputs, targets)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        raise ValueError(f"expected a scalar tensor, got {_shape(loss)}")
                except Exception as exc:
                    field = "model.loss" if loss_fn is not None else "model.factory"
                    raise ConfigError(f"field {field!r}: {loss_name} of the model's outputs {_shape(outputs)} "
                                      f"against the targets of {given} fails: {type(exc).__name__}: "
                                      f"{_first_line(exc)}") from None
                try:
                    scores = (metric_fn or top1)(outputs, targets)
                    if not isinstance(scores, torch.Tensor) or scores.numel() != batch:
                        raise ValueError(f"expected one score per sample ({batch}), got {_shape(scores)}")
                except Exception as exc:
                    field = "model.metric" if metric_fn is not None else "model.factory"
                    raise ConfigError(f"field {field!r}: {metric_name} of the model's outputs {_shape(outputs)} "
                                      f"against the targets of {given} fails: {type(exc).__name__}: "
                                      f"{_first_line(exc)}") from None
        finally:
            model.train(was_training)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _rewind_checkpoint_state(config: SearchConfig, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Early weights from ``space.rewind_checkpoint``; checks that rewinding has a source of early weights."""
    from .errors import ConfigError

    space = config.space
    if space.rewind == "never":
        return None
    if space.rewind_checkpoint is not None:
        early = copy.deepcopy(model)
        load_checkpoint(early, (config.base_dir / space.rewind_checkpoint).resolve(), field="space.rewind_checkpoint")
        return _clone_state(early)
    if config.model.pretrain is None:
        raise ConfigError(f"field 'space.rewind': rewinding ({space.rewind!r}) needs early weights: pre-train the "
                          "model here (model.pretrain) or give them as space.rewind_checkpoint")
    if space.rewind_epoch >= config.model.pretrain.epochs:
        raise ConfigError(f"field 'space.rewind_epoch': expected fewer than model.pretrain.epochs="
                          f"{config.model.pretrain.epochs} epochs, got {space.rewind_epoch}")
    return None  # taken during pre-training by ensure_dense


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rewind_file(config: SearchConfig) -> Path:
    """Where pre-training keeps the weights of the rewind point (beside the dense model)."""
    return config.study_path / f"dense_epoch{config.space.rewind_epoch}.pt"


def ensure_dense(config: SearchConfig, inputs: Inputs) -> nn.Module:
    """The trained dense model: from the checkpoint, or pre-trained once and kept in the work dir.

    With rewinding from pre-training (``space.rewind`` not ``never``, no ``space.rewind_checkpoint``)
    the weights after ``space.rewind_epoch`` epochs are saved beside it (:func:`rewind_file`) and
    put into ``inputs.settings.rewind_state``. Capturing them does not change the dense model.
    """
    from .errors import ConfigError

    model = inputs.model
    if config.model.pretrain is None:
        return model
    path = config.study_path / DENSE_FILE
    wants_early = config.space.rewind != "never" and config.space.rewind_checkpoint is None
    early_path = rewind_file(config)
    if path.is_file():
        load_checkpoint(model, path, field="work_dir (dense model)")
        if wants_early:
            if not early_path.is_file():
                raise ConfigError(f"field 'space.rewind': {path} was pre-trained without keeping the weights after "
                                  f"epoch {config.space.rewind_epoch} ({early_path.name}); delete {path} to pre-train "
                                  "again, or use another work_dir")
            early = copy.deepcopy(model)
            load_checkpoint(early, early_path, field="work_dir (rewind weights)")
            inputs.settings = replace(inputs.settings, rewind_state=_clone_state(early))
        return model
    pre = config.model.pretrain
    settings = TrainSettings(epochs=pre.epochs, optimizer=pre.optimizer, lr=pre.lr,
                             loss_fn=inputs.settings.finetune.loss_fn)
    torch.manual_seed(config.study.seed)
    captured: list[dict[str, torch.Tensor]] = []
    after_step = None
    if wants_early and config.space.rewind_epoch == 0:
        captured.append(_clone_state(model))
    elif wants_early:
        from .schedule import batches_per_epoch

        at_step, steps = config.space.rewind_epoch * batches_per_epoch(inputs.train_loader, settings), [0]

        def after_step(m: nn.Module) -> None:
            steps[0] += 1
            if steps[0] == at_step:
                captured.append(_clone_state(m))

    train(model, inputs.train_loader, settings, after_step=after_step)
    path.parent.mkdir(parents=True, exist_ok=True)
    if wants_early:
        if not captured:
            raise ConfigError(f"field 'space.rewind_epoch': pre-training ended before epoch "
                              f"{config.space.rewind_epoch} (the data loader yielded fewer batches than its len())")
        _save_atomic(captured[0], early_path)  # before dense.pt: a dense.pt from this run implies its rewind file
        inputs.settings = replace(inputs.settings, rewind_state=captured[0])
    _save_atomic(model.state_dict(), path)
    return model


def _save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: a reader (or a second search pre-training
    at the same moment) never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _dense_baseline(study: optuna.Study, dense: nn.Module, inputs: Inputs) -> DenseBaseline:
    stored = study.user_attrs.get(DENSE_ATTR)
    if stored:
        return DenseBaseline(**stored)
    baseline = measure_dense(dense, inputs.val_loader, inputs.settings)
    study.set_user_attr(DENSE_ATTR, asdict(baseline))
    crash_point("dense.measured")
    return baseline


def make_executor(config: SearchConfig, payload: TrialPayload, modules: list[ModuleType]) -> Executor:
    execution = config.execution
    if execution.backend == "in_process":
        return InProcessExecutor(payload)
    return RayExecutor(payload, address=execution.address, parallel=execution.parallel,
                       cpus_per_trial=execution.cpus_per_trial, gpus_per_trial=execution.gpus_per_trial,
                       memory_per_trial_mb=execution.memory_per_trial_mb,
                       max_retries=execution.max_retries, modules=modules)


def trial_dir(config: SearchConfig, number: int) -> Path:
    """Trial ``number``'s model files: ``<work_dir>/studies/<study>/trials/NNNNN`` (per study: several
    studies in one work dir never share or overwrite each other's files)."""
    return config.study_path / "trials" / f"{number:05d}"


def _store_files(config: SearchConfig, number: int, output: TrialOutput) -> Path:
    directory = trial_dir(config, number)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / model_files.WEIGHTS_FILE).write_bytes(output.weights)
    (directory / model_files.SKELETON_FILE).write_bytes(output.skeleton)
    return directory


def _enqueue_baselines(study: optuna.Study, space: SearchSpace, sparsities: list[float], method: str) -> None:
    for sparsity in sparsities:
        study.enqueue_trial(space.uniform_params(sparsity, method),
                            user_attrs={BASELINE_ATTR: f"uniform {method} {sparsity:g}"}, skip_if_exists=True)


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


def dense_checkpoint(config: SearchConfig) -> Path | None:
    """The file the dense model comes from: the configured checkpoint, or the one pre-trained for this study
    (``<work_dir>/studies/<study>/dense.pt``)."""
    return config.checkpoint_path if config.model.pretrain is None else config.study_path / DENSE_FILE


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


def run_search(config: SearchConfig, *, resume: bool = False,
               on_progress: ProgressCallback | None = None) -> SearchSummary:
    """Run (or resume) the study of ``config`` until it holds ``study.n_trials`` finished trials.

    Other drivers may work on the same study at the same time (``autoprune resume`` with the same config,
    from another process or machine, on a shared PostgreSQL storage): together they run ``n_trials``.
    """
    inputs = build_inputs(config)
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
    if resume:
        study: optuna.Study | None = load_study(storage, config.study.name, sampler)
    else:
        ensure_absent(storage, config.study.name)
        study = None
    config.work_path.mkdir(parents=True, exist_ok=True)  # only now: a failed check above creates nothing
    db.prepare(db_url)
    snapshot = safe_snapshot(config.snapshot())  # passwords masked: stored in the study and logged to MLflow
    tracker = Tracker(config.tracking_uri, config.experiment_name,
                      artifact_location=None if config.tracking.uri else (config.work_path / "artifacts").as_uri())
    dense = ensure_dense(config, inputs)
    if study is None:
        study = create_study(storage, config.study.name, sampler, snapshot, snapshot_digest(snapshot))
    if not study.user_attrs.get(SEEDED_ATTR):  # new, or its creator died before seeding it
        record_config(study, snapshot, snapshot_digest(snapshot))
        highs = highs if highs is not None else _sensitivity_highs(config, inputs.space)
        if highs and UNIT_HIGH_ATTR not in study.user_attrs:
            study.set_user_attr(UNIT_HIGH_ATTR, highs)
        _enqueue_sensitivity(study, inputs.space, config)
        _enqueue_baselines(study, inputs.space, config.baseline_sparsities, config.space.methods[0])
        study.set_user_attr(SEEDED_ATTR, True)
        crash_point("study.seeded")
    # per-unit caps are decided once, when the study is created: a resume uses the stored ones
    inputs.space = inputs.space.with_unit_highs(study.user_attrs.get(UNIT_HIGH_ATTR) or {})
    driver = Driver(study).start()
    notices: list[str] = []
    try:
        recovered = driver.recover_stale() if resume else []
        baseline = _dense_baseline(study, dense, inputs)
        parent_id = tracker.start_parent(config.study.name, snapshot, asdict(baseline))
        db.record_search(db_url, study_name=config.study.name, storage_url=config.storage_url, snapshot=snapshot,
                         dense_checkpoint=dense_checkpoint(config), experiment_id=tracker.experiment_id,
                         parent_run_id=parent_id)
        crash_point("registry.recorded")
        report = StudyReport(tracker, parent_id, config.study.name, baseline, space=inputs.space,
                             models=model_source(config, inputs))
        if not driver.others_alive():  # a live driver logs its own trials; don't race it
            notices += repair_records(study, tracker, parent_id, config)
            report.log_missing(study, inputs.space)
        payload = TrialPayload(dense, inputs.train_loader, inputs.val_loader, inputs.settings, baseline,
                               threads=max(1, int(config.execution.cpus_per_trial)))
        executor = make_executor(config, payload, inputs.modules)
        status, storage_lost = "FAILED", False
        try:
            _loop(config, study, inputs.space, executor, report, on_progress, driver)
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


def repair_records(study: optuna.Study, tracker: Tracker, parent_id: str, config: SearchConfig) -> list[str]:
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
               and not all((trial_dir(config, t.number) / name).is_file()
                           for name in (model_files.WEIGHTS_FILE, model_files.SKELETON_FILE))]
    if missing:
        lines.append(f"complete trials {missing} have no model files under {config.study_path / 'trials'}: "
                     "they get no MLflow model and cannot be exported")
    return lines


def _loop(config: SearchConfig, study: optuna.Study, space: SearchSpace, executor: Executor,
          report: StudyReport, on_progress: ProgressCallback | None, driver: Driver) -> None:
    target, parallel = config.study.n_trials, config.execution.parallel
    distributions = space.distributions()
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
            executor.submit(trial.number, plan)
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
            if isinstance(outcome, str):
                if not tell_failure(study, trial, outcome, attrs):
                    continue  # another driver took the trial over as stale; its copy runs instead
                failed += 1
                front_size = report.trial_finished(study, number, plan, trial.user_attrs, None, outcome)
                message = f"trial {number} failed: {outcome.splitlines()[-1][:120]}"
            else:
                _store_files(config, number, outcome)  # before tell: a COMPLETE trial always has its model
                # the files' sha256, kept in the study: only these files are ever unpickled (export, report)
                attrs[model_files.FILES_ATTR] = model_files.digests(outcome.weights, outcome.skeleton)
                crash_point("trial.files_saved")
                if not tell_success(study, trial, outcome.result, attrs):
                    continue
                front_size = report.trial_finished(study, number, plan, trial.user_attrs, outcome.result, None)
                r = outcome.result
                message = (f"trial {number}: accuracy {r.accuracy:.4f}, size {r.size_bytes:,} B, "
                           f"latency {r.latency_ms:.3f} ms")
            progress(message)
