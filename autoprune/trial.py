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
(0/1) and ``rounds``, for quantized models ``accuracy_before_quantization``, and with a test split
(``TrialSettings.test_loader``) ``test_accuracy``. ``accuracy_drop`` is measured against
:attr:`DenseBaseline.reference_accuracy`: the better of the dense model and the dense model fine-tuned
with the trials' budget (:func:`measure_finetuned_dense`). Fine-tuning recovery: BatchNorm statistics are
re-estimated after each pruning step (``bn_recalibration_batches``) and the dense model is the distillation
teacher; ``extra`` also says ``finetune_epochs_spent`` and, with screening (:class:`Screening`),
``screened_accuracy`` (the pruned model's validation accuracy before fine-tuning).

Devices: a trial runs on :func:`trial_device` (``TrialSettings.device``: ``auto`` picks CUDA when the trial
was given a GPU). The dense model is copied there (the caller's stays where it is), calibration batches for
the scores are moved there, and training and evaluation move each batch as they read it. Fine-tuning and
evaluation run in ``finetune.precision`` / ``eval_precision``. The model's files are written from a CPU copy,
so they do not depend on the device that made them; int8 quantization runs on the CPU. Latency is timed on
``latency_device`` (default: the trial's). ``extra`` says ``on_cuda`` and ``latency_on_cuda`` (0/1) and, on
CUDA, ``gpu_peak_memory_mb``.

N:M (semi-structured) methods (``wanda_2:4``...) record the pattern of each layer they pruned on the model
(:func:`~autoprune.methods.llm.semi_structured_layers`); the trial hands it back as
``TrialOutput.semi_structured``, since ``extra`` holds numbers only and the pattern is a fact about the model's
files (what a GPU runtime may convert to sparse kernels), not a measurement.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from . import measure, model_files, quantize, schedule
from .errors import ConfigError
from .methods import PruneContext, get_method
from .methods import llm as llm_methods
from .methods import unstructured as unstructured_methods
from .plan import Plan, TrialResult
from .training import (
    TrainSettings,
    model_device,
    recalibrate_batchnorm,
    resolve_device,
    steps_per_epoch,
    synchronize,
    to_device,
)

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
    test_loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, compare=False,
                                                                             repr=False)
    """Held-out batches (the data's third split): each trial records ``test_accuracy`` on them; the search
    selects on the validation data only."""
    bn_recalibration_batches: int = 0
    """Training batches to re-estimate BatchNorm statistics with after each pruning step (0: off)."""
    screening: Screening | None = None
    """Multi-fidelity screening of the pruned model before fine-tuning (None: every plan gets the full budget)."""
    device: str = "cpu"
    """``auto``, ``cpu`` or ``cuda`` (``execution.device``): where the trial trains, evaluates and times."""
    gpus: float = 0.0
    """The GPUs each trial is given (``execution.gpus_per_trial``): ``auto`` picks CUDA only when > 0."""
    eval_precision: str = "fp32"
    """Precision of every evaluation (``finetune.eval_precision``, default ``finetune.precision``)."""
    latency_device: str | None = None
    """``cpu`` or ``cuda`` (``latency.device``); None: the trial's device."""
    latency_runtime: str = "eager"
    """``eager``, ``onnxruntime`` or ``compiled`` (``latency.runtime``; :func:`autoprune.measure.runtime_model`):
    what the pruned and the dense models are timed in."""
    task: str = "classification"
    """``model.task``: with ``causal_lm`` the first objective is validation perplexity (lower is better)."""


@dataclass(frozen=True)
class Screening:
    """A plan whose accuracy right after pruning (and BatchNorm recalibration), measured on the validation
    data, is below ``min_accuracy_fraction x`` the dense model's gets ``short_fraction`` of the fine-tuning
    steps instead of all of them.

    With ``max_dominated`` (successive halving over the fine-tuning budget, for several objectives), every
    one-shot plan first gets ``short_fraction`` of the steps; its validation accuracy then (with its
    non-zero parameters) is compared with ``rivals``, the same two numbers of plans screened before it
    (the driver passes them). It gets the rest of the budget only if fewer than ``max_dominated`` rivals
    dominate it (at least as accurate and as small, better in one) and the accuracy threshold holds:
    a plan that earlier plans already beat at the same cost stops there."""

    min_accuracy_fraction: float = 0.5
    short_fraction: float = 0.25
    max_dominated: int | None = None
    rivals: tuple[tuple[float, int], ...] = ()

    def dominated_by(self, accuracy: float, nonzero: int) -> int:
        """How many rivals are at least as accurate and as small as (``accuracy``, ``nonzero``), better in one."""
        return sum(1 for a, n in self.rivals if a >= accuracy and n <= nonzero and (a > accuracy or n < nonzero))


@dataclass(frozen=True)
class DenseBaseline:
    """The dense model's numbers, measured once per study with nothing else running."""

    accuracy: float
    latency_ms: float
    size_bytes: int
    params: int
    macs: int
    finetuned_accuracy: float | None = None
    """The dense model fine-tuned with the trials' budget (same settings, nothing pruned): a trial's
    ``accuracy_drop`` is measured against the better of this and ``accuracy``."""
    test_accuracy: float | None = None
    """On the test split (when the data give one); never used to select."""
    finetuned_test_accuracy: float | None = None
    latency_device: str = "cpu"
    """Where ``latency_ms`` was timed (``cpu`` or ``cuda``); every trial's latency is for this device..."""
    latency_batch: int = 1
    """...and this batch size..."""
    latency_runtime: str = "eager"
    """...in this runtime (``eager``, ``onnxruntime``, ``compiled``)."""
    metric: str = "accuracy"
    """What ``accuracy`` holds: ``accuracy`` (higher is better) or ``perplexity`` (``model.task: causal_lm``,
    lower is better); reports name the objective by it."""

    @property
    def reference_accuracy(self) -> float:
        """What accuracy drops are measured against: the better of dense and dense fine-tuned."""
        better = min if self.metric == "perplexity" else max
        return better(self.accuracy, self.finetuned_accuracy if self.finetuned_accuracy is not None else self.accuracy)

    def drop(self, value: float) -> float:
        """How much worse ``value`` is than :attr:`reference_accuracy` (for perplexity: how much higher)."""
        return value - self.reference_accuracy if self.metric == "perplexity" else self.reference_accuracy - value


@dataclass(frozen=True)
class TrialOutput:
    """A result plus the pruned model's files (bytes), for the driver to store."""

    result: TrialResult
    weights: bytes
    skeleton: bytes
    semi_structured: dict[str, str] = field(default_factory=dict)
    """``{layer: "N:M"}`` for the layers an N:M method pruned (JSON-able; empty when none): the driver stores
    it with the Optuna trial and logs it to the trial's MLflow run."""


def trial_device(settings: TrialSettings, gpu_assigned: bool | None = None) -> torch.device:
    """The device of a trial with ``settings`` (:func:`~autoprune.training.resolve_device`); ``gpu_assigned``:
    whether this process was given a GPU (Ray's assignment), by default ``settings.gpus > 0``."""
    return resolve_device(settings.device, settings.gpus > 0 if gpu_assigned is None else gpu_assigned)


def latency_device(settings: TrialSettings, device: torch.device) -> torch.device:
    """Where latency is timed: ``settings.latency_device``, or the trial's ``device``."""
    if settings.latency_device is None:
        return device
    return resolve_device(settings.latency_device, True, field="latency.device")


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself if it is on ``device``, else a copy there (the original is never moved). ``cuda`` and
    ``cuda:0`` are the same device here (a trial sees only its own GPU, as index 0)."""
    here = model_device(model)
    if here.type == device.type and (here.index or 0) == (device.index or 0):
        return model
    return copy.deepcopy(model).to(device)


def make_context(train_loader: Batches, settings: TrialSettings, example: torch.Tensor) -> PruneContext:
    """The pruning methods' inputs; calibration batches are moved to the device of ``example``."""
    device = example.device
    calibration = [(to_device(x, device), to_device(y, device))
                   for x, y in islice(iter(train_loader), settings.calibration_batches)]
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
    dense: nn.Module, train_loader: Batches, plan: Plan, settings: TrialSettings, context: PruneContext,
    *, screen: Callable[[nn.Module], bool] | None = None, info: dict[str, float] | None = None,
) -> tuple[nn.Module, float]:
    """A copy of ``dense`` pruned and fine-tuned on the plan's schedule (with rewinding if asked),
    checked to reach the plan; returns it and the seconds spent training.

    After each pruning step (and rewinding) BatchNorm statistics are re-estimated from
    ``settings.bn_recalibration_batches`` training batches. ``dense`` is the distillation teacher.
    ``screen(pruned) -> full budget?`` sees the plan's one-shot pruned model (trained weights, BatchNorm
    recalibrated, before any rewinding) before fine-tuning starts; False gives the plan
    ``settings.screening.short_fraction`` of the fine-tuning steps. ``info`` (if given) receives
    ``finetune_epochs_spent``.
    """
    model = copy.deepcopy(dense)
    early = schedule.early_model(dense, settings.rewind_state) if plan.rewind else None
    steps = schedule.Schedule(model, plan, context)
    ft = settings.finetune
    full = True
    if screen is not None and plan.rounds > 1:  # screen the final one-shot plan, not the first round
        probe = prune_model(dense, plan, context)
        recalibrate_batchnorm(probe, train_loader, settings.bn_recalibration_batches)
        full = screen(probe)
        del probe
    halving = (screen is not None and plan.rounds == 1 and settings.screening is not None
               and settings.screening.max_dominated is not None)  # screened after a short fine-tuning
    screen_here = screen is not None and plan.rounds == 1 and not halving  # one-shot: screen the model pruned below
    budgets = schedule.round_steps(train_loader, ft, plan.rounds) if full and not screen_here else None
    spent: float | None = None
    has_unstructured = any(get_method(i.method).family == "unstructured" for i in plan.layers)
    train_seconds = 0.0
    for step in range(1, plan.rounds + 1):
        targets = steps.targets(step)
        step_context = steps.step_context(step)
        removed = schedule.prune_step(model, targets, step_context)
        steps.record(removed)
        masks = unstructured_methods.masks_of(model) if has_unstructured else None
        recalibrate_batchnorm(model, train_loader, settings.bn_recalibration_batches)
        if screen_here and step == 1:
            full = screen(model)
        if budgets is None and full:
            budgets = schedule.round_steps(train_loader, ft, plan.rounds)
        elif budgets is None:  # screened out: a short budget of optimizer steps
            fraction = settings.screening.short_fraction if settings.screening is not None else 0.0
            short = round(fraction * ft.epochs * steps_per_epoch(train_loader, ft.max_batches))
            budgets = list(schedule.split_steps(short, plan.rounds))
        if early is not None:
            schedule.rewind(model, early, targets, removed, step_context, masks)
            recalibrate_batchnorm(model, train_loader, settings.bn_recalibration_batches)
        if step == plan.rounds:
            steps.check(model)
        started = time.perf_counter()
        if halving:
            assert screen is not None and settings.screening is not None
            spent = _halving_finetune(model, train_loader, ft, settings.screening.short_fraction, masks, dense, screen)
        else:
            schedule.finetune(model, train_loader, ft, budgets[step - 1], masks, teacher=dense)
        synchronize(model_device(model))  # CUDA runs asynchronously: the time includes the queued work
        train_seconds += time.perf_counter() - started
    steps.check(model)  # zeros held through fine-tuning
    if info is not None:
        per_epoch = max(1, steps_per_epoch(train_loader, ft.max_batches))
        info["finetune_epochs_spent"] = (spent / per_epoch if spent is not None else float(ft.epochs) if full
                                         else sum(b or 0 for b in budgets or []) / per_epoch)
    return model, train_seconds


def _halving_finetune(model: nn.Module, train_loader: Batches, ft: TrainSettings, short_fraction: float,
                      masks: Mapping[str, torch.Tensor] | None, teacher: nn.Module,
                      screen: Callable[[nn.Module], bool]) -> int:
    """Fine-tune ``short_fraction`` of the budget's steps, then the rest only if ``screen`` promotes the
    model; returns the optimizer steps spent. (The rest is a second run: a learning-rate schedule restarts.)"""
    total = ft.epochs * steps_per_epoch(train_loader, ft.max_batches)
    short = round(short_fraction * total)
    schedule.finetune(model, train_loader, ft, short, masks, teacher=teacher)
    if not screen(model):
        return short
    schedule.finetune(model, train_loader, ft, total - short, masks, teacher=teacher)
    return total


def run_trial(
    dense: nn.Module,
    train_loader: Batches,
    val_loader: Batches,
    plan: Plan,
    settings: TrialSettings,
    baseline: DenseBaseline,
) -> TrialOutput:
    """Prune, fine-tune, quantize if planned, and measure one model; raises if any step fails.

    Runs on :func:`trial_device`; ``dense`` is not moved (a copy goes to the device when it is elsewhere).
    """
    torch.manual_seed(settings.seed)
    device = trial_device(settings)
    timing_device = latency_device(settings, device)
    if plan.quantize and timing_device.type != "cpu":
        raise ConfigError(f"field 'latency.device': int8-quantized models (space.quantize) run on the CPU only; "
                          f"expected cpu for a plan that quantizes, got {timing_device.type}")
    _check_runtime(settings, timing_device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dense = on_device(dense, device)
    example = to_device(next(iter(val_loader))[0][:1], device)
    context = make_context(train_loader, settings, example)
    evaluate = _evaluator(settings)
    info: dict[str, float] = {}
    screen = None
    if settings.screening is not None:
        threshold = settings.screening.min_accuracy_fraction * baseline.accuracy

        def screen(pruned: nn.Module) -> bool:
            info["screened_accuracy"] = accuracy = evaluate(pruned, val_loader)
            if settings.screening is None or settings.screening.max_dominated is None:
                return accuracy >= threshold
            info["screened_nonzero"] = nonzero = measure.count_parameters(pruned)[1]
            info["screened_dominated"] = dominated = settings.screening.dominated_by(accuracy, nonzero)
            return accuracy >= threshold and dominated < settings.screening.max_dominated

    model, train_seconds = prune_and_finetune(dense, train_loader, plan, settings, context, screen=screen, info=info)
    semi_structured = llm_methods.semi_structured_layers(model)  # read before quantization replaces the model
    macs = measure.count_macs(model, example)
    extra = {"quantized": float(plan.quantize), "rewound": float(plan.rewind), "rounds": float(plan.rounds), **info,
             "on_cuda": float(device.type == "cuda"), "latency_on_cuda": float(timing_device.type == "cuda")}
    if plan.quantize:
        extra["accuracy_before_quantization"] = evaluate(model, val_loader)
        model = quantize.quantize_model(model.cpu(), example.cpu())  # dynamic int8 kernels: CPU only

    accuracy = evaluate(model, val_loader)
    if settings.test_loader is not None:  # reported, never an objective
        extra["test_accuracy"] = evaluate(model, settings.test_loader)
    params, nonzero = quantize.parameter_counts(model)
    files, weights, skeleton = _model_files(model)
    if device.type == "cuda":
        extra["gpu_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    inputs = to_device(_latency_inputs(val_loader, settings.latency_batch), timing_device)
    try:
        latency_ms, raw_ms, ratio = measure.honest_latency_ms(
            model.to(timing_device), on_device(dense, timing_device), inputs, dense_alone_ms=baseline.latency_ms,
            threads=settings.latency_threads, rounds=settings.latency_rounds, runtime=settings.latency_runtime,
        )
    except Exception as exc:
        if plan.quantize and settings.latency_runtime != "eager":  # the int8 layers do not export / compile
            raise ConfigError(f"field 'latency.runtime': cannot time this plan's int8-quantized model "
                              f"(space.quantize) in {settings.latency_runtime} ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); expected "
                              f"latency.runtime eager, or space.quantize never") from exc
        raise
    if (baseline.latency_device, baseline.latency_runtime) != (timing_device.type, settings.latency_runtime):
        # the reference was timed elsewhere (another device or runtime): no scaling by it
        latency_ms = raw_ms
        extra["latency_unscaled"] = 1.0
    result = TrialResult(
        accuracy=accuracy,
        accuracy_drop=baseline.drop(accuracy),
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
    return TrialOutput(result, weights, skeleton, semi_structured)


def _evaluator(settings: TrialSettings) -> Callable[[nn.Module, Batches], float]:
    """``evaluate(model, loader)``: the task's metric in the settings' evaluation precision."""
    def evaluate(model: nn.Module, loader: Batches) -> float:
        return measure.evaluate_task(model, loader, settings.task, settings.metric_fn, settings.eval_precision)
    return evaluate


def _model_files(model: nn.Module) -> tuple[model_files.ModelFiles, bytes, bytes]:
    """The model's files (and their bytes), written from a CPU copy: the same files whatever device trained it."""
    cpu_model = on_device(model, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        files = model_files.save_model(cpu_model, tmp)
        return files, Path(files.weights_path).read_bytes(), Path(files.skeleton_path).read_bytes()


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
    device = trial_device(settings)
    timing_device = latency_device(settings, device)
    example = to_device(next(iter(val_loader))[0][:1], device)
    here = on_device(dense, device)
    inputs = to_device(_latency_inputs(val_loader, settings.latency_batch), timing_device)
    _check_runtime(settings, timing_device)
    latency_ms = measure.reference_latency_ms(on_device(here, timing_device), inputs, threads=settings.latency_threads,
                                              min_run_time=min_run_time, runtime=settings.latency_runtime)
    test = settings.test_loader
    evaluate = _evaluator(settings)
    return DenseBaseline(
        accuracy=evaluate(here, val_loader),
        latency_ms=latency_ms,
        size_bytes=model_files.model_size_bytes(on_device(dense, torch.device("cpu"))),
        params=measure.count_parameters(dense)[0],
        macs=measure.count_macs(here, example),
        test_accuracy=None if test is None else evaluate(here, test),
        latency_device=timing_device.type,
        latency_batch=settings.latency_batch,
        latency_runtime=settings.latency_runtime,
        metric="perplexity" if settings.task == "causal_lm" else "accuracy",
    )


def _check_runtime(settings: TrialSettings, timing_device: torch.device) -> None:
    """ONNX Runtime is timed on the CPU (``latency.device`` may be unset while trials run on CUDA)."""
    if settings.latency_runtime == "onnxruntime" and timing_device.type != "cpu":
        raise ConfigError(f"field 'latency.runtime': onnxruntime is timed on the CPU; expected latency.device cpu "
                          f"with it, got {timing_device.type} (set latency.device: cpu)")


def measure_finetuned_dense(dense: nn.Module, train_loader: Batches, val_loader: Batches, settings: TrialSettings,
                            baseline: DenseBaseline) -> DenseBaseline:
    """``baseline`` with the accuracy (and test accuracy) of a copy of ``dense`` fine-tuned exactly as a trial
    is (same settings and budget, an empty plan: nothing pruned), so that accuracy drops do not count the
    extra training a trial gets as recovery. ``dense`` is not changed."""
    torch.manual_seed(settings.seed)
    device = trial_device(settings)
    context = make_context(train_loader, settings, to_device(next(iter(val_loader))[0][:1], device))
    model, _ = prune_and_finetune(on_device(dense, device), train_loader, Plan(()), settings, context)
    test = settings.test_loader
    evaluate = _evaluator(settings)
    return replace(baseline, finetuned_accuracy=evaluate(model, val_loader),
                   finetuned_test_accuracy=None if test is None else evaluate(model, test))
