"""Measurements of a (pruned) model: accuracy, parameter counts, MACs and latency.

Depends on torch only.

Latency on a shared machine
---------------------------
Wall-clock latency is only comparable when measured under the same conditions.  When several
trials run in parallel on one machine they disturb each other (shared cores, caches, memory
bandwidth), so a raw median measured inside a trial says as much about the neighbours as about
the model.  :func:`time_interleaved` times several models round-robin in the same window, so they
all see the same interference; the *ratio* of their medians is much more stable than either raw
median.  :func:`honest_latency_ms` uses that: a trial times its pruned model interleaved with the
dense reference model and reports::

    latency_ms = dense_alone_ms * (pruned_median / dense_median_same_window)

where ``dense_alone_ms`` was measured once, before the trials start, as the lowest of several
medians (:func:`reference_latency_ms`).  :func:`time_interleaved` alternates the models block by
block (~0.3 ms blocks), not window by window: next to a busy process that took the spread (CV) of
the estimate from 20-60 % to about 1 % (benchmarks/RESULTS.md, "Latency spread").  What it does
not remove: interference that slows the two models by different factors (e.g. cache pressure
hitting the larger model harder).

On CUDA (inputs and models on a GPU) the same functions apply: ``torch.utils.benchmark.Timer``
synchronizes the device around each timed block, and every timing starts with a few untimed warm-up
calls (kernel selection, allocator) followed by ``torch.cuda.synchronize``. ``threads`` then only
limits the CPU threads that launch the kernels.

All timing is single-threaded by default (``threads=1``): on a small shared machine, letting
torch use several threads made medians swing by an order of magnitude.  Every function that
changes ``torch.get_num_threads()`` restores it, and every function that switches a model to
eval mode restores its training flag.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from .training import as_fp32, autocast, model_device, synchronize, to_device

__all__ = [
    "LatencySample",
    "count_macs",
    "count_parameters",
    "evaluate_accuracy",
    "honest_latency_ms",
    "reference_latency_ms",
    "time_interleaved",
    "time_model",
]


@dataclass(frozen=True)
class LatencySample:
    """Summary of repeated latency measurements of one model.

    ``median_ms`` and ``iqr_ms`` are over the timed blocks (each block is the mean time of one
    forward call over a block of back-to-back calls, as ``torch.utils.benchmark`` measures);
    ``runs`` is the number of those blocks.
    """

    median_ms: float
    iqr_ms: float
    runs: int


@contextmanager
def _eval_modes(models: Iterable[nn.Module]) -> Iterator[None]:
    """Put the models (all submodules) in eval mode; restore every module's flag afterwards."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in reversed(flags):
            m.training = flag


def _eval_mode(model: nn.Module) -> AbstractContextManager[None]:
    return _eval_modes([model])


@contextmanager
def _num_threads(threads: int) -> Iterator[None]:
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_model_device = model_device

# Untimed calls before timing on CUDA: the first calls select kernels and grow the allocator's pools.
_CUDA_WARMUP_CALLS = 10


def _warm_up(models: Iterable[nn.Module], inputs: Tensor) -> None:
    """One untimed call of each model (ten on CUDA), then wait for the device."""
    calls = _CUDA_WARMUP_CALLS if inputs.device.type == "cuda" else 1
    for model in models:
        for _ in range(calls):
            model(inputs)
    synchronize(inputs.device)


def top1(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample top-1 correctness (1.0 or 0.0): ``argmax`` over dim 1 against class indices."""
    return (outputs.argmax(dim=1) == targets).float()


def evaluate_accuracy(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], metric: Callable[[Tensor, Tensor], Tensor] | None = None,
    precision: str = "fp32",
) -> float:
    """Mean of ``metric(outputs, targets)`` over all samples of ``loader``; by default top-1 accuracy
    (fraction in [0, 1]) of a classifier: ``argmax`` over dim 1 of the output against class indices.

    ``metric`` returns one score per sample (a tensor of ``batch`` elements); higher is better.
    The model runs in eval mode under ``torch.no_grad()``; its training flags are restored.
    Inputs are moved to the device of the model's first parameter.  ``precision`` (``fp32``, ``bf16``,
    ``fp16``) runs the forward pass under ``torch.autocast``; the metric sees fp32 outputs.  Raises
    ``ValueError`` if the loader yields no samples.
    """
    metric = metric or top1
    device = _model_device(model)
    score = 0.0
    total = 0
    with _eval_mode(model), torch.no_grad():
        for inputs, targets in loader:
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            with autocast(device, precision):
                outputs = model(inputs)
            scores = metric(as_fp32(outputs), targets)
            if scores.numel() != inputs.shape[0]:
                raise ValueError(f"evaluate_accuracy: the metric returned {scores.numel()} scores for a batch "
                                 f"of {inputs.shape[0]}; expected one per sample")
            score += float(scores.double().sum().item())
            total += int(scores.numel())
    if total == 0:
        raise ValueError("evaluate_accuracy: the loader yielded no samples")
    return score / total


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(total, non_zero)`` counts over the model's parameters (buffers excluded).

    Shared (tied) parameters are counted once.  ``non_zero`` counts elements that are not equal
    to zero, so it reflects unstructured (masked) sparsity while ``total`` does not.
    """
    total = 0
    non_zero = 0
    for p in model.parameters():
        total += p.numel()
        non_zero += int(torch.count_nonzero(p.detach()).item())
    return total, non_zero


def count_macs(model: nn.Module, example_inputs: Tensor) -> int:
    """Multiply-accumulate operations of one forward pass on ``example_inputs``.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs // 2), for the whole
    batch given: autoprune passes a single sample (batch size 1), so the result is MACs per
    sample.  The count depends on tensor shapes only: zeros in unstructured-pruned (masked)
    weights are still counted, which is the true cost for dense kernels; only structured pruning
    (smaller shapes) lowers it.  Operators FlopCounterMode does not know (e.g. elementwise ops,
    pooling, normalisation) count as zero.  Runs in eval mode under ``no_grad``, so BatchNorm
    running statistics are not touched; the training flags are restored.  PyTorch's fused
    multi-head-attention "fast path" (taken in eval mode under ``no_grad``) is invisible to the
    counter, so it is switched off while counting.
    """
    counter = FlopCounterMode(display=False)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with _eval_mode(model), torch.no_grad(), counter:
            model(example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops()) // 2


def _timer(model: nn.Module, inputs: Tensor, threads: int) -> benchmark.Timer:
    return benchmark.Timer(
        stmt="model(inputs)",
        globals={"model": model, "inputs": inputs},
        num_threads=threads,
    )


def _sample(times_s: list[float]) -> LatencySample:
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) >= 2:
        q = statistics.quantiles(ms, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return LatencySample(median_ms=statistics.median(ms), iqr_ms=iqr, runs=len(ms))


def time_model(
    model: nn.Module, inputs: Tensor, *, threads: int = 1, min_run_time: float = 0.2
) -> LatencySample:
    """Latency of ``model(inputs)`` with ``torch.utils.benchmark.Timer.blocked_autorange``.

    Eval mode, ``torch.inference_mode()``, ``threads`` intra-op threads (restored afterwards).
    Runs one untimed warm-up call first (ten on CUDA, then a synchronize).
    """
    with _num_threads(threads), _eval_mode(model), torch.inference_mode():
        _warm_up([model], inputs)  # allocator, lazy init, kernel selection
        measurement = _timer(model, inputs, threads).blocked_autorange(min_run_time=min_run_time)
    return _sample(list(measurement.times))


# Target duration of one timed block in time_interleaved: short blocks alternate the models
# finely, so a burst of interference hits both; see the module docstring.
_INTERLEAVE_BLOCK_S = 0.0003


def _block_number(timer: benchmark.Timer, block_s: float) -> int:
    """Smallest power of two of calls whose block takes at least ``block_s``."""
    number = 1
    while number < 1 << 20 and timer.timeit(number).raw_times[0] < block_s:
        number *= 2
    return number


def time_interleaved(
    models: Mapping[str, nn.Module],
    inputs: Tensor,
    *,
    threads: int = 1,
    rounds: int = 5,
    min_run_time: float = 0.05,
) -> dict[str, LatencySample]:
    """Time several models round-robin so that they all see the same interference.

    Each model gets a block size (a power of two of back-to-back calls, at least ~0.3 ms per
    block, one call for slower models).  Each of ``rounds`` rounds then alternates the models
    block by block with ``benchmark.Timer.timeit`` -- one block of each in turn, the order
    reversed every other round -- until the round has used ``min_run_time`` seconds per model on
    average (every model at least one block).  Returns, per model, the median (and IQR) of the
    per-call time over all its blocks from all rounds; ``runs`` is the number of blocks.

    Alternating at block level matters: with one ``blocked_autorange(min_run_time)`` window per
    model per round, windows 50 ms apart saw different interference and the ratio of medians
    still spread by 20-50 % (CV) next to a busy process; block-level alternation gave 1-4 %
    (see benchmarks/RESULTS.md).  Ratios between the returned medians are what is meaningful on
    a busy machine; see :func:`honest_latency_ms`.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not models:
        return {}
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with _num_threads(threads), torch.inference_mode(), _eval_modes(models.values()):
        timers = {name: _timer(models[name], inputs, threads) for name in names}
        _warm_up(models.values(), inputs)
        numbers = {name: _block_number(timers[name], _INTERLEAVE_BLOCK_S) for name in names}
        budget = min_run_time * len(names)
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            spent = 0.0
            while spent < budget:
                for name in order:
                    measurement = timers[name].timeit(numbers[name])
                    spent += measurement.raw_times[0]
                    times[name].extend(measurement.times)
    return {name: _sample(times[name]) for name in names}


def reference_latency_ms(
    model: nn.Module, inputs: Tensor, *, threads: int = 1, repeats: int = 5, min_run_time: float = 0.2
) -> float:
    """The lowest of ``repeats`` :func:`time_model` medians: a reference latency (``dense_alone_ms``).

    Interference from other processes only ever adds time, so on a machine that is not
    guaranteed to be idle the lowest median is the best estimate of the undisturbed latency;
    a single median taken while something else ran was seen 2x too high.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    medians = [time_model(model, inputs, threads=threads, min_run_time=min_run_time) for _ in range(repeats)]
    return min(m.median_ms for m in medians)


def honest_latency_ms(
    pruned: nn.Module,
    dense: nn.Module,
    inputs: Tensor,
    *,
    dense_alone_ms: float,
    threads: int = 1,
    rounds: int = 5,
    min_run_time: float = 0.05,
) -> tuple[float, float, float]:
    """Latency estimate of ``pruned`` that is robust to other work running on the machine.

    Times ``pruned`` and ``dense`` interleaved (:func:`time_interleaved`) and scales the
    reference ``dense_alone_ms`` (the dense model's latency on an idle machine, with the same
    inputs and threads, e.g. from :func:`reference_latency_ms`) by their ratio.  The estimate is
    only as good as that reference: measure it once, carefully, before trials start.

    Returns ``(estimated_ms, raw_pruned_ms, ratio)`` where ``raw_pruned_ms`` is the pruned
    model's median in this (possibly busy) window and ``ratio = pruned_median / dense_median``.
    """
    samples = time_interleaved(
        {"pruned": pruned, "dense": dense},
        inputs,
        threads=threads,
        rounds=rounds,
        min_run_time=min_run_time,
    )
    raw_pruned = samples["pruned"].median_ms
    ratio = raw_pruned / samples["dense"].median_ms
    return dense_alone_ms * ratio, raw_pruned, ratio
