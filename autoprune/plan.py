"""What a trial is asked to do (:class:`Plan`) and what it reports (:class:`TrialResult`, or :class:`TrialFailure`).

Plain frozen dataclasses with no dependencies: they cross process boundaries
(Ray) and are written to Optuna and MLflow by the driver.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class LayerPlan:
    """One prunable unit: a layer (or dependency group named by its root layer).

    ``sparsity`` is the fraction of the unit removed: of its weights for
    unstructured methods, of its output channels / neurons / heads for
    structured ones, and 1.0-or-nothing for layer removal.
    """

    layer: str
    method: str
    sparsity: float


SCHEDULES = ("oneshot", "iterative")


@dataclass(frozen=True)
class Plan:
    """A complete pruning recipe for one trial.

    ``schedule``: ``"oneshot"`` prunes to the layers' sparsities at once and fine-tunes;
    ``"iterative"`` reaches them in ``rounds`` prune/fine-tune rounds on the cubic AGP schedule
    (:mod:`autoprune.schedule`). ``rewind``: after each pruning step the surviving weights are
    reset to their early (rewind-point) values before fine-tuning (lottery-ticket rewinding).
    ``quantize``: int8 dynamic quantization of Linear layers after fine-tuning.
    """

    layers: tuple[LayerPlan, ...]
    quantize: bool = False
    schedule: str = "oneshot"
    rounds: int = 1
    rewind: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.rounds < 1 or (self.schedule == "oneshot" and self.rounds != 1):
            raise ValueError(f"rounds must be 1 for a one-shot schedule and >= 1 otherwise, got {self.rounds}")

    def as_params(self) -> dict[str, str | float]:
        """Flat ``{name: value}`` view, used for MLflow params and tables."""
        params: dict[str, str | float] = {}
        for item in self.layers:
            params[f"{item.layer}.method"] = item.method
            params[f"{item.layer}.sparsity"] = round(item.sparsity, 6)
        params["quantize"] = str(self.quantize)
        params["schedule"] = self.schedule
        params["rounds"] = self.rounds
        params["rewind"] = str(self.rewind)
        return params


@dataclass(frozen=True)
class TrialResult:
    """Measured outcome of one pruned and fine-tuned model.

    ``latency_ms`` is the honest estimate used as an objective: the ratio of the
    pruned model's median time to the dense model's median time, both timed
    interleaved in the same window, times the dense latency measured alone.
    ``latency_raw_ms`` is the pruned model's own median in that window.
    """

    accuracy: float
    accuracy_drop: float
    params: int
    nonzero_params: int
    macs: int
    size_bytes: int
    latency_ms: float
    latency_raw_ms: float
    latency_ratio: float
    param_sparsity: float
    train_seconds: float
    extra: dict[str, float] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        metrics = {k: float(v) for k, v in asdict(self).items() if k != "extra"}
        metrics.update({k: float(v) for k, v in self.extra.items()})
        return metrics


#: Why a trial failed, as :attr:`TrialFailure.kind`.
FAILURE_KINDS = ("user_code", "out_of_memory", "worker_lost", "unsupported_layer")

#: The most characters of a traceback kept with a failed trial (its start and its end).
MAX_TRACEBACK = 16_000


@dataclass(frozen=True)
class TrialFailure:
    """Why a trial failed, as data: stored with the trial (Optuna user attrs) and its MLflow run.

    ``kind`` is one of :data:`FAILURE_KINDS`: ``user_code`` (the trial raised: the model, the data, the loss,
    a plan the model cannot reach), ``out_of_memory`` (``torch.OutOfMemoryError``, ``MemoryError``, or Ray's
    memory monitor killed the worker), ``worker_lost`` (the worker process or its node died, after any retries)
    or ``unsupported_layer`` (a pruning method met a unit it cannot prune). ``reason`` is the short,
    ``Type: message`` description (the ``fail_reason`` attribute); ``traceback`` the full one, at most
    :data:`MAX_TRACEBACK` characters (see :func:`bounded_traceback`).
    """

    kind: str
    reason: str
    traceback: str = ""

    def __post_init__(self) -> None:
        if self.kind not in FAILURE_KINDS:
            raise ValueError(f"kind must be one of {FAILURE_KINDS}, got {self.kind!r}")


def bounded_traceback(text: str, limit: int = MAX_TRACEBACK) -> str:
    """``text`` if it fits in ``limit`` characters, else its start and its end (where the raising frame is)."""
    if len(text) <= limit:
        return text
    head = limit // 8
    marker = f"\n[... {len(text) - limit} characters cut ...]\n"
    return text[:head] + marker + text[len(text) - (limit - head - len(marker)):]
