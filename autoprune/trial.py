"""One trial: copy the dense model, prune it by plan, fine-tune, (quantize,) measure.

Depends on torch (and Torch-Pruning through the methods) only: it runs the same
in-process, in a test, or on a Ray worker, and knows nothing of Optuna or MLflow.

Order of a trial: prune and fine-tune on the plan's schedule (one-shot, or iterative rounds;
with rewinding, surviving weights reset to their early values after each pruning step; see
:mod:`autoprune.schedule`), check that every unit reached its planned sparsity, then, when the
plan says so, quantize the Linear layers to int8 (:mod:`autoprune.quantize`). Accuracy, size,
latency and parameter counts are measured on the final (quantized) model; MACs are counted on
the model before quantization (same shapes, int8 multiply-accumulates; torch's FLOP counter
does not see quantized kernels). ``TrialResult.extra`` says ``quantized`` (0/1), ``rewound``
(0/1) and ``rounds``, and for quantized models ``accuracy_before_quantization``.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from . import measure, model_files, quantize, schedule
from .methods import PruneContext, get_method
from .methods import unstructured as unstructured_methods
from .plan import Plan, TrialResult
from .training import TrainSettings

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrialSettings:
    """Everything a trial needs besides the model, data and plan."""

    finetune: TrainSettings
    protected: frozenset[str]
    latency_batch: int = 1
    latency_threads: int = 1
    latency_rounds: int = 5
    latency_min_run_time: float = 0.05
    max_layer_sparsity: float = 0.95
    round_to: int | None = None
    calibration_batches: int = 2
    seed: int = 0
    metric_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """The task's metric ``(outputs, targets) -> per-sample scores``; None: top-1 accuracy."""
    rewind_state: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    """The dense model's state dict at the rewind point, for plans with ``rewind`` (else None)."""


@dataclass(frozen=True)
class DenseBaseline:
    """The dense model's numbers, measured once per study with nothing else running."""

    accuracy: float
    latency_ms: float
    size_bytes: int
    params: int
    macs: int


@dataclass(frozen=True)
class TrialOutput:
    """A result plus the pruned model's files (bytes), for the driver to store."""

    result: TrialResult
    weights: bytes
    skeleton: bytes


def make_context(train_loader: Batches, settings: TrialSettings, example: torch.Tensor) -> PruneContext:
    calibration = list(islice(iter(train_loader), settings.calibration_batches))
    return PruneContext(
        example_inputs=example,
        calibration_batches=calibration,
        loss_fn=settings.finetune.loss_fn or nn.functional.cross_entropy,
        protected=settings.protected,
        max_layer_sparsity=settings.max_layer_sparsity,
        round_to=settings.round_to,
    )


def _by_method(plan: Plan) -> dict[str, dict[str, float]]:
    by_method: dict[str, dict[str, float]] = {}
    for item in plan.layers:
        by_method.setdefault(item.method, {})[item.layer] = item.sparsity
    return by_method


def apply_plan(model: nn.Module, plan: Plan, context: PruneContext) -> None:
    """Prune ``model`` in place to the plan's sparsities at once, family by family (removal, structured,
    unstructured); the plan's schedule, rewinding and quantization are not applied here."""
    schedule.prune_step(model, _by_method(plan), context)


def prune_model(dense: nn.Module, plan: Plan, context: PruneContext) -> nn.Module:
    """A pruned copy of ``dense`` (one-shot, not fine-tuned)."""
    model = copy.deepcopy(dense)
    apply_plan(model, plan, context)
    return model


def prune_and_finetune(
    dense: nn.Module, train_loader: Batches, plan: Plan, settings: TrialSettings, context: PruneContext
) -> tuple[nn.Module, float]:
    """A copy of ``dense`` pruned and fine-tuned on the plan's schedule (with rewinding if asked),
    checked to reach the plan; returns it and the seconds spent training."""
    model = copy.deepcopy(dense)
    early = schedule.early_model(dense, settings.rewind_state) if plan.rewind else None
    steps = schedule.Schedule(model, plan, context)
    budgets = schedule.round_steps(train_loader, settings.finetune, plan.rounds)
    has_unstructured = any(get_method(i.method).family == "unstructured" for i in plan.layers)
    train_seconds = 0.0
    for step in range(1, plan.rounds + 1):
        targets = steps.targets(step)
        step_context = steps.step_context(step)
        removed = schedule.prune_step(model, targets, step_context)
        steps.record(removed)
        masks = unstructured_methods.masks_of(model) if has_unstructured else None
        if early is not None:
            schedule.rewind(model, early, targets, removed, step_context, masks)
        if step == plan.rounds:
            steps.check(model)
        started = time.perf_counter()
        schedule.finetune(model, train_loader, settings.finetune, budgets[step - 1], masks)
        train_seconds += time.perf_counter() - started
    steps.check(model)  # zeros held through fine-tuning
    return model, train_seconds


def run_trial(
    dense: nn.Module,
    train_loader: Batches,
    val_loader: Batches,
    plan: Plan,
    settings: TrialSettings,
    baseline: DenseBaseline,
) -> TrialOutput:
    """Prune, fine-tune, quantize if planned, and measure one model; raises if any step fails."""
    torch.manual_seed(settings.seed)
    example = next(iter(val_loader))[0][:1]
    context = make_context(train_loader, settings, example)
    model, train_seconds = prune_and_finetune(dense, train_loader, plan, settings, context)
    macs = measure.count_macs(model, example)
    extra = {"quantized": float(plan.quantize), "rewound": float(plan.rewind), "rounds": float(plan.rounds)}
    if plan.quantize:
        extra["accuracy_before_quantization"] = measure.evaluate_accuracy(model, val_loader, settings.metric_fn)
        model = quantize.quantize_model(model, example)

    accuracy = measure.evaluate_accuracy(model, val_loader, settings.metric_fn)
    params, nonzero = quantize.parameter_counts(model)
    with tempfile.TemporaryDirectory() as tmp:
        files = model_files.save_model(model, tmp)
        weights = Path(files.weights_path).read_bytes()
        skeleton = Path(files.skeleton_path).read_bytes()
    inputs = _latency_inputs(val_loader, settings.latency_batch)
    latency_ms, raw_ms, ratio = measure.honest_latency_ms(
        model, dense, inputs, dense_alone_ms=baseline.latency_ms,
        threads=settings.latency_threads, rounds=settings.latency_rounds,
    )
    result = TrialResult(
        accuracy=accuracy,
        accuracy_drop=baseline.accuracy - accuracy,
        params=params,
        nonzero_params=nonzero,
        macs=macs,
        size_bytes=files.total_bytes,
        latency_ms=latency_ms,
        latency_raw_ms=raw_ms,
        latency_ratio=ratio,
        param_sparsity=1.0 - nonzero / baseline.params,
        train_seconds=train_seconds,
        extra=extra,
    )
    return TrialOutput(result, weights, skeleton)


def _latency_inputs(loader: Batches, batch_size: int) -> torch.Tensor:
    inputs = next(iter(loader))[0]
    reps = -(-batch_size // inputs.shape[0])
    return inputs.repeat(reps, *([1] * (inputs.dim() - 1)))[:batch_size].clone()


def measure_dense(
    dense: nn.Module, val_loader: Batches, settings: TrialSettings, *, min_run_time: float | None = None
) -> DenseBaseline:
    """The dense model's accuracy, size, params, MACs and latency, timed alone.

    The reference latency every trial's is scaled from is timed longer than a trial's:
    ``min_run_time`` defaults to ten times ``settings.latency_min_run_time`` (0.5 s by default).
    """
    if min_run_time is None:
        min_run_time = 10 * settings.latency_min_run_time
    example = next(iter(val_loader))[0][:1]
    inputs = _latency_inputs(val_loader, settings.latency_batch)
    latency_ms = measure.reference_latency_ms(dense, inputs, threads=settings.latency_threads,
                                              min_run_time=min_run_time)
    return DenseBaseline(
        accuracy=measure.evaluate_accuracy(dense, val_loader, settings.metric_fn),
        latency_ms=latency_ms,
        size_bytes=model_files.model_size_bytes(dense),
        params=measure.count_parameters(dense)[0],
        macs=measure.count_macs(dense, example),
    )
