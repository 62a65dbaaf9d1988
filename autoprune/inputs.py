"""The search's inputs: the user's model and data (from the config's factories, or Python objects), checked
against each other, the search space derived from the model, the trial settings, and the trained dense
model (from a checkpoint, or pre-trained once per study and kept in its directory). No Optuna, Ray or MLflow."""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .config import SearchConfig
from .errors import ConfigError
from .live import Live
from .methods import PruneContext
from .model_io import build_loaders, build_model, check_loaders, import_factory, load_checkpoint
from .space import SearchSpace, find_head
from .task_check import check_task
from .training import TrainSettings, causal_lm_loss, train
from .trial import Batches, Screening, TrialSettings, trial_device


@dataclass
class Inputs:
    """The user's model, data and search space, built and checked from the config."""

    model: nn.Module
    train_loader: Batches
    val_loader: Batches
    space: SearchSpace
    settings: TrialSettings
    modules: list[ModuleType]
    test_loader: Batches | None = None
    """The data's held-out test split (a third loader from the factory, or ``Search(test_data=...)``)."""


def _user_module(module: ModuleType) -> bool:
    """A module shipped to Ray workers: one that is not an installed package."""
    path = getattr(module, "__file__", None) or ""
    return "site-packages" not in path and "dist-packages" not in path


def _model_and_modules(config: SearchConfig, live: Live) -> tuple[nn.Module, list[ModuleType]]:
    if live.model is not None:
        return copy.deepcopy(live.model).eval(), []  # the caller's model is never changed
    if config.model.factory is None:
        raise ConfigError("field 'model.factory': required unless the model is given (autoprune.Search(model=...))")
    factory, module = import_factory(config.model.factory, config.base_dir, "model.factory")
    return build_model(factory, config.model.kwargs, "model.factory"), [module]


def _loaders(config: SearchConfig, live: Live) -> tuple[tuple[Batches, Batches, Batches | None], list[ModuleType]]:
    """``(train, val, test or None)`` and the modules they came from; a live ``test_data`` (given to
    ``autoprune.Search``) is the test split, also beside a data factory (it takes the factory's place)."""
    batch_size = config.data.batch_size if config.data is not None else 64
    lm = config.model.task == "causal_lm"
    test = None if live.test_data is None else _task_batches(as_loader(live.test_data, batch_size, shuffle=False), lm)
    if live.train_data is not None:
        loaders = tuple(_task_batches(as_loader(data, batch_size, shuffle=which == "train"), lm)
                        for which, data in (("train", live.train_data), ("val", live.val_data)))
        return check_loaders((*loaders, test), "train_data/val_data/test_data"), []
    if config.data is None or config.data.factory is None:
        raise ConfigError("field 'data.factory': required unless the data are given "
                          "(autoprune.Search(train_data=..., val_data=...))")
    factory, module = import_factory(config.data.factory, config.base_dir, "data.factory")
    if lm:
        factory = _lm_factory(factory)
    train, val, factory_test = build_loaders(factory, config.data.kwargs, "data.factory")
    if test is not None:
        check_loaders((train, val, test), "test_data")
    return (train, val, test if test is not None else factory_test), [module]


class LMBatches:
    """A causal LM's batches as ``(input_ids, labels)`` (``model.task: causal_lm``): ``input_ids`` alone (a
    tensor, or the 1-tuple a ``TensorDataset`` of ids yields) become ``(input_ids, input_ids)``, since the
    loss shifts the labels itself; ``(input_ids, labels)`` pairs pass unchanged."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self) -> Any:
        for batch in self.loader:
            if isinstance(batch, torch.Tensor):
                yield batch, batch
            elif isinstance(batch, tuple | list) and len(batch) == 1:
                yield batch[0], batch[0]
            else:
                yield batch

    def __len__(self) -> int:
        return len(self.loader)


def _task_batches(loader: Any, lm: bool) -> Any:
    return LMBatches(loader) if lm and loader is not None else loader


def _lm_factory(factory: Any) -> Any:
    """The data factory with each returned loader seen through :class:`LMBatches`."""
    def wrapped(**kwargs: Any) -> Any:
        loaders = factory(**kwargs)
        if not isinstance(loaders, tuple | list):
            return loaders  # build_loaders names the mistake
        return tuple(_task_batches(loader, True) for loader in loaders)
    return wrapped


def _task_functions(config: SearchConfig, loss_fn: Any, metric_fn: Any) -> Any:
    """``model.task``'s loss (``causal_lm``: the shifted next-token cross-entropy unless ``model.loss``), and
    a check that the settings it does not support are off."""
    if config.model.task != "causal_lm":
        return loss_fn
    if metric_fn is not None:
        raise ConfigError("field 'model.metric': expected none with model.task causal_lm, whose objective is "
                          f"validation perplexity; got {config.model.metric!r}")
    if config.finetune.screening.enabled:
        raise ConfigError("field 'finetune.screening': expected it off with model.task causal_lm (screening "
                          "compares accuracies, higher being better); got enabled: true")
    return loss_fn or causal_lm_loss


def as_loader(data: Any, batch_size: int, *, shuffle: bool) -> Batches:
    """A map-style dataset (``__getitem__`` + ``__len__``, not already batches) becomes a DataLoader."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(0) if shuffle else None)
    return data


def build_inputs(config: SearchConfig, live: Live | None = None) -> Inputs:
    """Build the model and data (from the config's factories, or the ``live`` objects), check that they fit
    each other, derive the search space; no side effects on disk."""
    live = live or Live()
    task = {key: import_factory(spec, config.base_dir, f"model.{key}")
            for key in ("loss", "metric") if (spec := getattr(config.model, key)) is not None}
    torch.manual_seed(config.study.seed)  # the same initial weights in every process, so pre-training repeats
    model, model_modules = _model_and_modules(config, live)
    (train_loader, val_loader, test_loader), data_modules = _loaders(config, live)
    if config.checkpoint_path is not None:
        load_checkpoint(model, config.checkpoint_path)
    loss_fn = task["loss"][0] if "loss" in task else None
    metric_fn = task["metric"][0] if "metric" in task else None
    task_loss = _task_functions(config, loss_fn, metric_fn)
    check_task(model, train_loader, val_loader, loss_fn, metric_fn, task=config.model.task)
    loss_fn = task_loss
    head = config.space.head or find_head(model)
    if head not in dict(model.named_modules()):
        raise ConfigError(f"field 'space.head': no module named {head!r} in the model")
    settings = TrialSettings(
        finetune=finetune_settings(config, loss_fn),
        protected=frozenset({head}),
        latency_batch=config.latency.batch_size,
        latency_threads=config.latency.threads,
        latency_rounds=config.latency.rounds,
        latency_min_run_time=config.latency.min_run_time,
        max_layer_sparsity=config.space.max_layer_sparsity,
        round_to=config.space.round_to,
        calibration_batches=config.space.calibration_batches,
        seed=config.study.seed,
        rewind_state=_rewind_checkpoint_state(config, model),
        metric_fn=metric_fn,
        test_loader=test_loader,
        bn_recalibration_batches=config.finetune.bn_recalibration_batches,
        screening=_screening(config),
        device=config.execution.device,
        gpus=config.execution.gpus_per_trial,
        eval_precision=config.finetune.eval_precision or config.finetune.precision,
        latency_device=config.latency.device,
        latency_runtime=config.latency.runtime,
        task=config.model.task,
    )
    example = next(iter(val_loader))[0][:1]
    context = PruneContext(example_inputs=example, protected=settings.protected,
                           max_layer_sparsity=settings.max_layer_sparsity, round_to=settings.round_to)
    sparsity = config.space.sparsity
    space = SearchSpace.from_model(model, context, config.space.methods, config.space.include,
                                   config.space.exclude, low=sparsity.low, high=sparsity.high,
                                   step=sparsity.step, quantize=config.space.quantize,
                                   schedules=tuple(config.space.schedules),
                                   iterative_rounds=config.space.iterative_rounds, rewind=config.space.rewind,
                                   parametrization=config.space.parametrization,
                                   spread=config.space.allocation_spread)
    candidates = (*model_modules, *data_modules, *(module for _, module in task.values()))
    modules = list({m.__name__: m for m in candidates if _user_module(m)}.values())
    return Inputs(model, train_loader, val_loader, space, settings, modules, test_loader)


def finetune_settings(config: SearchConfig, loss_fn: Any = None) -> TrainSettings:
    """The per-trial fine-tuning settings of ``config.finetune`` (distillation unpacked)."""
    ft = config.finetune
    plain = ft.model_dump(exclude={"distill", "bn_recalibration_batches", "screening", "eval_precision"})
    distill = {} if ft.distill is None else {"distill_weight": ft.distill.weight,
                                             "distill_temperature": ft.distill.temperature}
    return TrainSettings(**plain, **distill, loss_fn=loss_fn)


def _screening(config: SearchConfig) -> Screening | None:
    screening = config.finetune.screening
    if not screening.enabled:
        return None
    return Screening(min_accuracy_fraction=screening.min_accuracy_fraction, short_fraction=screening.short_fraction,
                     max_dominated=screening.max_dominated)


def fingerprint(inputs: Inputs) -> dict[str, Any]:
    """What identifies the model and data beyond the config (live objects have no factory name): the
    architecture, and the data's batch count and batch shapes; stored in the study, compared on resume."""
    x, y = next(iter(inputs.val_loader))
    return {
        "model": hashlib.sha256(str(inputs.model).encode()).hexdigest()[:16],
        "train_batches": _length(inputs.train_loader),
        "val_batches": _length(inputs.val_loader),
        "batch": [list(getattr(x, "shape", [])), list(getattr(y, "shape", []))],
        **({"test_batches": _length(inputs.test_loader)} if inputs.test_loader is not None else {}),
    }


def _length(loader: Batches) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _rewind_checkpoint_state(config: SearchConfig, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Early weights from ``space.rewind_checkpoint``; checks that rewinding has a source of early weights."""
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
    model = inputs.model
    if config.model.pretrain is None:
        return model
    path = config.dense_path
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
                             loss_fn=inputs.settings.finetune.loss_fn, precision=config.finetune.precision)
    device = trial_device(inputs.settings)  # pre-trained where the trials run (this process's GPU, if any)
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

    train(model.to(device), inputs.train_loader, settings, after_step=after_step)  # Module.to moves in place
    model.to("cpu")  # kept and saved on the CPU: dense.pt does not depend on the device that trained it
    captured = [{k: v.cpu() for k, v in state.items()} for state in captured]
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
