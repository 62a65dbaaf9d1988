"""What a trial is asked to do (:class:`Plan`) and what it reports (:class:`TrialResult`).

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


@dataclass(frozen=True)
class Plan:
    """A complete pruning recipe for one trial."""

    layers: tuple[LayerPlan, ...]
    quantize: bool = False

    def as_params(self) -> dict[str, str | float]:
        """Flat ``{name: value}`` view, used for MLflow params and tables."""
        params: dict[str, str | float] = {}
        for item in self.layers:
            params[f"{item.layer}.method"] = item.method
            params[f"{item.layer}.sparsity"] = round(item.sparsity, 6)
        params["quantize"] = str(self.quantize)
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
