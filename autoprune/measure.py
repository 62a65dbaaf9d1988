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

Runtimes
--------
Eager PyTorch is not what a user deploys, and the ranking of pruned models can differ in the runtime
that runs them.  :func:`runtime_model` turns a model into a module the functions above time as they time
the model itself: ``eager`` (the model), ``compiled`` (``torch.compile``: compiled on its first, untimed,
call) or ``onnxruntime`` (:class:`OnnxRuntimeModel`: the model exported with ``torch.onnx.export(...,
dynamo=True)`` and run by an ONNX Runtime ``InferenceSession`` with ``threads`` intra-op threads on the
CPU).  Compare a pruned model with a dense one only in the same runtime.  ``onnx``, ``onnxscript`` and
``onnxruntime`` are imported when first needed (the ``deploy`` extra).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from .training import as_fp32, autocast, causal_lm_nll, model_device, synchronize, to_device

__all__ = [
    "RUNTIMES",
    "LatencySample",
    "OnnxRuntimeModel",
    "count_macs",
    "count_parameters",
    "evaluate_accuracy",
    "evaluate_perplexity",
    "honest_latency_ms",
    "onnx_bytes",
    "reference_latency_ms",
    "runtime_model",
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


def evaluate_perplexity(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], precision: str = "fp32") -> float:
    """``exp`` of the mean next-token negative log-likelihood over every counted token of ``loader``
    (:func:`~autoprune.training.causal_lm_nll`; lower is better, 1.0 for a model that is always sure and right).

    Tokens, not sequences, are averaged, so batches of different lengths weigh by their tokens. Same
    eval-mode, device and precision handling as :func:`evaluate_accuracy`. Raises ``ValueError`` if the
    loader yields no token to predict."""
    device = _model_device(model)
    nll, tokens = 0.0, 0
    with _eval_mode(model), torch.no_grad():
        for inputs, targets in loader:
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            with autocast(device, precision):
                outputs = model(inputs)
            batch_nll, batch_tokens = causal_lm_nll(outputs, targets)
            nll, tokens = nll + float(batch_nll), tokens + batch_tokens
    if tokens == 0:
        raise ValueError("evaluate_perplexity: the loader yielded no token to predict")
    return math.exp(nll / tokens)


def evaluate_task(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], task: str = "classification",
                  metric: Callable[[Tensor, Tensor], Tensor] | None = None, precision: str = "fp32") -> float:
    """The ``model.task``'s objective on ``loader``: :func:`evaluate_perplexity` for ``causal_lm``, else
    :func:`evaluate_accuracy` (with the user's ``metric``, if any). The one place trials, sensitivity analysis
    and :meth:`autoprune.Search.evaluate` choose it."""
    if task == "causal_lm":
        return evaluate_perplexity(model, loader, precision)
    return evaluate_accuracy(model, loader, metric, precision)


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
    model: nn.Module, inputs: Tensor, *, threads: int = 1, repeats: int = 5, min_run_time: float = 0.2,
    runtime: str = "eager",
) -> float:
    """The lowest of ``repeats`` :func:`time_model` medians: a reference latency (``dense_alone_ms``).

    Interference from other processes only ever adds time, so on a machine that is not
    guaranteed to be idle the lowest median is the best estimate of the undisturbed latency;
    a single median taken while something else ran was seen 2x too high.  ``runtime``: see
    :func:`runtime_model` (the model is converted once, before timing).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    model = runtime_model(model, inputs, runtime, threads=threads)
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
    runtime: str = "eager",
) -> tuple[float, float, float]:
    """Latency estimate of ``pruned`` that is robust to other work running on the machine.

    Times ``pruned`` and ``dense`` interleaved (:func:`time_interleaved`) and scales the
    reference ``dense_alone_ms`` (the dense model's latency on an idle machine, with the same
    inputs and threads, e.g. from :func:`reference_latency_ms`) by their ratio.  The estimate is
    only as good as that reference: measure it once, carefully, before trials start.

    Returns ``(estimated_ms, raw_pruned_ms, ratio)`` where ``raw_pruned_ms`` is the pruned
    model's median in this (possibly busy) window and ``ratio = pruned_median / dense_median``.
    ``runtime`` (:func:`runtime_model`) is the runtime both models are timed in; ``dense_alone_ms``
    must have been measured in the same one.
    """
    samples = time_interleaved(
        {"pruned": runtime_model(pruned, inputs, runtime, threads=threads),
         "dense": runtime_model(dense, inputs, runtime, threads=threads)},
        inputs,
        threads=threads,
        rounds=rounds,
        min_run_time=min_run_time,
    )
    raw_pruned = samples["pruned"].median_ms
    ratio = raw_pruned / samples["dense"].median_ms
    return dense_alone_ms * ratio, raw_pruned, ratio


# ---- runtimes: what the model is deployed in ----

RUNTIMES = ("eager", "onnxruntime", "compiled")
"""The runtimes :func:`runtime_model` times a model in (``latency.runtime``)."""

#: Largest batch an exported graph with a dynamic batch dimension accepts.
MAX_BATCH = 4096


def export_program(model: nn.Module, inputs: Tensor, *, dynamic: bool = True) -> tuple[torch.export.ExportedProgram,
                                                                                       bool]:
    """``torch.export`` of ``model`` (in eval mode) on ``inputs``, with a dynamic batch dimension when ``dynamic``;
    returns the program and whether its batch is dynamic.

    A dynamic batch needs an example batch of at least 2 (torch specialises a size of 1), so a batch of one is
    doubled for the export. A model that specialises the batch size (a reshape to a fixed batch...) is exported
    for ``inputs``' shape instead; errors of that last export propagate.
    """
    with _eval_mode(model):
        if dynamic:
            example = inputs if inputs.shape[0] > 1 else torch.cat([inputs, inputs])
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            try:
                return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), True
            except Exception:  # specialised batch: the static export below still works
                pass
        return torch.export.export(model, (inputs,)), False


@contextmanager
def _quiet_onnx() -> Iterator[None]:
    """Silence the ONNX exporter's chatter (skipped torchvision ops, deprecations inside torch); errors still raise."""
    import logging
    import warnings

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def onnx_bytes(model: nn.Module, inputs: Tensor, *, dynamic: bool = True) -> tuple[bytes, bool]:
    """``model`` as an ONNX file (its bytes) through ``torch.onnx.export(..., dynamo=True)`` of
    :func:`export_program`'s program; returns the bytes and whether the batch dimension is dynamic.
    Needs ``onnx`` and ``onnxscript`` (the ``deploy`` extra); export errors propagate."""
    program, is_dynamic = export_program(model, inputs, dynamic=dynamic)
    with _quiet_onnx():
        exported = torch.onnx.export(program, dynamo=True, verbose=False)
    return exported.model_proto.SerializeToString(), is_dynamic


class OnnxRuntimeModel(nn.Module):
    """An ONNX Runtime ``InferenceSession`` behind a module's call, so the timing functions time it as they
    time a model: ``forward(x)`` feeds the CPU tensor ``x`` to the session's one input and returns the
    session's outputs (a list of numpy arrays). ``threads`` intra-op threads, one inter-op thread, sequential
    execution, all graph optimisations, CPU execution provider. It has no parameters: no copy, no ``.to``."""

    def __init__(self, model: bytes | str, *, threads: int = 1) -> None:
        super().__init__()
        import onnxruntime as ort

        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        feeds = self.session.get_inputs()
        if len(feeds) != 1:
            raise ValueError(f"OnnxRuntimeModel: expected an ONNX graph with one input, got {len(feeds)}")
        self.input_name = feeds[0].name

    def forward(self, x: Tensor) -> list:
        return self.session.run(None, {self.input_name: x.detach().cpu().numpy()})


def runtime_model(model: nn.Module, inputs: Tensor, runtime: str = "eager", *, threads: int = 1) -> nn.Module:
    """``model`` ready to be timed on ``inputs`` in ``runtime`` (one of :data:`RUNTIMES`).

    ``eager``: the model itself. ``compiled``: ``torch.compile(model)``, compiled by its first (untimed
    warm-up) call; dynamo's caches are cleared first, because compiling model after model in one process
    (each trial's) would otherwise reach its recompile limit, after which torch silently runs eager code.
    ``onnxruntime``: an :class:`OnnxRuntimeModel` of the model exported for ``inputs`` (dynamic batch where
    the model allows), ``threads`` intra-op threads; CPU inputs only.
    """
    if runtime == "eager":
        return model
    if runtime == "compiled":
        torch.compiler.reset()
        return torch.compile(model)
    if runtime == "onnxruntime":
        if inputs.device.type != "cpu":
            raise ValueError(f"runtime onnxruntime: ONNX Runtime is timed on the CPU; got inputs on {inputs.device}")
        return OnnxRuntimeModel(onnx_bytes(model, inputs)[0], threads=threads)
    raise ValueError(f"runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
