"""Sensitivity analysis: validation accuracy against sparsity, one unit at a time, no fine-tuning.

For every prunable unit of the search space and every configured method that can
prune it, a copy of the dense model has only that unit pruned at each ratio
(everything else dense) and is evaluated on the validation data. The curves give
each unit a *bound*: the largest ratio whose accuracy drop stays within a
tolerance. The result is written to ``<work_dir>/sensitivity.json``; when a NEW
study is created in that work dir, the search enqueues trials built from the
bounds first (see :func:`seed_trials`).

With ``model.task: causal_lm`` the curves are of validation perplexity (lower is better) and the *drop*
is the relative perplexity increase, ``perplexity / dense perplexity - 1`` (:func:`quality_drop`): the
tolerance ``max_drop`` 0.05 allows 5 % higher perplexity, i.e. ``log(1.05)`` = 0.049 nats more mean
next-token loss. A relative measure, because perplexity has no fixed scale (from 1 to the vocabulary
size): one default then means the same for every model and data. The bounds, seeds and
``space.sensitivity_bounds`` caps are sparsities, used exactly as for accuracy. (A trial's
``accuracy_drop``, which ``space.constraints.max_accuracy_drop`` limits, is in perplexity units.) The result's
``metric`` says which; ``dense_accuracy`` and each point's ``accuracy`` then hold perplexities, as
:class:`~autoprune.trial.DenseBaseline` does.

Runs in-process in the driver (torch only for the measuring; no Ray), on the trials' device
(``execution.device``) and in their evaluation precision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import measure
from .config import SearchConfig
from .errors import AutopruneError, ConfigError
from .methods import PruneContext, get_method
from .plan import LayerPlan, Plan
from .space import SearchSpace

if TYPE_CHECKING:
    from .workspace import Workspace

SENSITIVITY_FILE = "sensitivity.json"
FORMAT_VERSION = 1
DEFAULT_RATIOS = (0.25, 0.5, 0.75, 0.9)
DEFAULT_MAX_DROP = 0.05
SENSITIVITY_ATTR = "autoprune.sensitivity"
ARTIFACT_DIR = "sensitivity"
REMOVE_RATIO = 1.0
METRICS = {"classification": "accuracy", "causal_lm": "perplexity"}
"""What the curves measure for each ``model.task``."""

log = logging.getLogger("autoprune.sensitivity")


@dataclass(frozen=True)
class Point:
    """One measurement: ``unit`` pruned by ``method`` at ``ratio``, the rest dense, not fine-tuned.
    ``accuracy`` is the task's metric (perplexity for ``causal_lm``); ``drop``: :func:`quality_drop`."""

    ratio: float
    accuracy: float | None
    drop: float | None
    param_sparsity: float | None
    error: str | None = None


@dataclass
class Curve:
    unit: str
    method: str
    family: str
    points: list[Point] = field(default_factory=list)
    bound: float = 0.0
    """Largest ratio such that it and every smaller measured ratio drop accuracy by at most ``max_drop``
    (for perplexity: raise it by at most that fraction)."""


@dataclass(frozen=True)
class SensitivityProgress:
    done: int
    total: int
    message: str


@dataclass
class SensitivityResult:
    study: str
    dense_accuracy: float
    ratios: list[float]
    max_drop: float
    methods: list[str]
    curves: list[Curve]
    bounds: dict[str, dict[str, Any]]
    fingerprint: str
    seconds: float = 0.0
    path: Path | None = None
    parent_run_id: str | None = None
    seeds: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    study_exists: bool = False
    metric: str = "accuracy"
    """``accuracy`` or ``perplexity`` (``model.task: causal_lm``): what ``dense_accuracy`` and the points hold,
    and how ``max_drop`` is meant (:func:`quality_drop`)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "study": self.study,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fingerprint": self.fingerprint,
            "metric": self.metric,
            "dense_accuracy": self.dense_accuracy,
            "ratios": self.ratios,
            "max_drop": self.max_drop,
            "methods": self.methods,
            "fine_tuned": False,
            "seconds": round(self.seconds, 3),
            "curves": [{**{k: v for k, v in asdict(c).items() if k != "points"},
                        "points": [asdict(p) for p in c.points]} for c in self.curves],
            "bounds": self.bounds,
            "seeds": [{"label": label, "params": params} for label, params in self.seeds],
        }


ProgressFn = Callable[[SensitivityProgress], None]


# ---- inputs ----
def parse_ratios(text: str) -> tuple[float, ...]:
    """``'0.25,0.5'`` -> ``(0.25, 0.5)``: sorted, unique, each in [0, 1); raises ``ValueError``."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"expected comma-separated sparsities such as 0.25,0.5,0.75,0.9, got {text!r}")
    ratios = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a number (expected e.g. 0.25,0.5,0.75,0.9)") from None
        if not 0.0 <= value < 1.0 or math.isnan(value):
            raise ValueError(f"{part} is outside [0, 1): a sparsity is the fraction of a unit removed")
        ratios.append(value)
    return tuple(sorted(set(ratios)))


def fingerprint(config: SearchConfig) -> str:
    """What the curves depend on: the model and data sections of the config."""
    snapshot = config.snapshot()
    text = json.dumps({"model": snapshot["model"], "data": snapshot["data"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- measuring ----
def measure_curves(dense: nn.Module, space: SearchSpace, context: PruneContext, val_loader: Any,
                   ratios: Sequence[float], methods: Sequence[str] | None = None, *, seed: int = 0,
                   on_progress: ProgressFn | None = None, metric: Callable[[Any, Any], Any] | None = None,
                   precision: str = "fp32", task: str = "classification") -> tuple[float, list[Curve]]:
    """Dense accuracy and one curve per (unit, method), ``methods`` restricting the methods; evaluated where
    ``dense`` is, in ``precision``. With ``task="causal_lm"``: dense perplexity, and curves of perplexity
    whose drops are relative increases (:func:`quality_drop`)."""
    name = _metric_name(task)
    jobs: list[tuple[str, str, str, list[float]]] = []
    for unit in space.units:
        for method in unit.methods:
            if methods is not None and method not in methods:
                continue
            family = get_method(method).family
            points = [0.0, REMOVE_RATIO] if family == "removal" else [0.0, *[r for r in ratios if r > 0]]
            jobs.append((unit.name, method, family, points))
    total = 1 + sum(len(points) for *_, points in jobs)
    dense_params = measure.count_parameters(dense)[0]
    dense_accuracy = measure.evaluate_task(dense, val_loader, task, metric, precision)
    done = 1
    if on_progress:
        on_progress(SensitivityProgress(done, total, f"dense {name} {dense_accuracy:.4f}"))
    curves = []
    for unit, method, family, points in jobs:
        curve = Curve(unit, method, family)
        for ratio in points:
            curve.points.append(_point(dense, unit, method, ratio, context, val_loader, dense_accuracy,
                                       dense_params, seed, metric, precision, task))
            done += 1
            if on_progress:
                p = curve.points[-1]
                shown = f"{name} {p.accuracy:.4f}" if p.accuracy is not None else f"failed: {p.error}"
                on_progress(SensitivityProgress(done, total, f"{unit} {method} {ratio:g}: {shown}"))
        curves.append(curve)
    return dense_accuracy, curves


def _point(dense: nn.Module, unit: str, method: str, ratio: float, context: PruneContext, val_loader: Any,
           dense_accuracy: float, dense_params: int, seed: int, metric: Callable[[Any, Any], Any] | None = None,
           precision: str = "fp32", task: str = "classification") -> Point:
    from .trial import prune_model

    torch.manual_seed(seed)
    try:
        model = prune_model(dense, Plan((LayerPlan(unit, method, ratio),)), context)
        accuracy = measure.evaluate_task(model, val_loader, task, metric, precision)
        _, nonzero = measure.count_parameters(model)
    except AutopruneError as exc:
        return Point(ratio, None, None, None, str(exc).splitlines()[0][:300])
    except Exception as exc:  # a method failing on one unit must not end a long analysis
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        return Point(ratio, None, None, None, f"{type(exc).__name__}: {first}")
    return Point(ratio, accuracy, quality_drop(dense_accuracy, accuracy, _metric_name(task)),
                 1.0 - nonzero / dense_params)


def _metric_name(task: str) -> str:
    if task not in METRICS:
        raise ValueError(f"field 'model.task': expected one of {', '.join(METRICS)}, got {task!r}")
    return METRICS[task]


def quality_drop(dense: float, value: float, metric: str = "accuracy") -> float:
    """How much worse ``value`` is than the dense model's ``dense``, in the unit of ``max_drop``: accuracy
    points lost (``dense - value``), or for ``perplexity`` (lower is better) the relative increase
    ``value / dense - 1`` (0.05: 5 % higher; ``exp`` of the mean next-token loss increase, minus 1).
    Negative when the pruned model is better."""
    if metric not in METRICS.values():
        raise ValueError(f"metric: expected one of {', '.join(METRICS.values())}, got {metric!r}")
    if metric == "perplexity":
        return value / dense - 1.0
    return dense - value


def tolerated(points: Sequence[Point], max_drop: float) -> float:
    """The largest ratio reached from 0 upward with every measured drop <= ``max_drop`` (0 if none)."""
    bound = 0.0
    for point in sorted(points, key=lambda p: p.ratio):
        if point.drop is None or point.drop > max_drop + 1e-12:
            break
        bound = point.ratio
    return bound


def unit_bounds(space: SearchSpace, curves: Sequence[Curve], max_drop: float) -> dict[str, dict[str, Any]]:
    """Per unit: ``{"method", "sparsity", "by_method"}``, or ``{"remove": bool}`` for a removable block.

    The unit's method is the one with the largest bound (config order breaks ties).
    """
    bounds: dict[str, dict[str, Any]] = {}
    for curve in curves:
        curve.bound = tolerated(curve.points, max_drop)
    for unit in space.units:
        mine = [c for c in curves if c.unit == unit.name]
        if not mine:
            continue
        if unit.removal:
            bounds[unit.name] = {"remove": mine[0].bound >= REMOVE_RATIO, "method": mine[0].method}
            continue
        by_method = {c.method: c.bound for c in mine}
        best = max(mine, key=lambda c: (c.bound, -unit.methods.index(c.method)))
        bounds[unit.name] = {"method": best.method, "sparsity": best.bound, "by_method": by_method}
    return bounds


# ---- seeding a new study ----
def _snap(space: SearchSpace, value: float) -> float:
    """``value`` clipped into the space's sparsity range, rounded down to its step."""
    value = min(max(value, space.low), space.high)
    if space.step:
        value = space.low + math.floor((value - space.low) / space.step + 1e-9) * space.step
    return round(value, 10)


def seed_params(space: SearchSpace, bounds: Mapping[str, Mapping[str, Any]],
                max_drop: float | None = None) -> list[tuple[str, dict[str, object]]]:
    """The trials a new study evaluates first: every unit at its bound, then at half its bound.

    Values are clipped into the space's ``[low, high]`` and rounded down to its
    step; units without a bound stay at ``low``; removable blocks are removed in
    the first trial when their removal was tolerated, kept in the second;
    trial-wide choices (quantize, ...) are set as in the space's uniform
    baselines. Identical trials are given once.
    """
    tolerance = f" (max drop {max_drop:g})" if max_drop is not None else ""
    seeds: list[tuple[str, dict[str, object]]] = []
    # trial-wide choices (quantize, ...) as the space's own baselines set them: off / the first option
    trial_wide = {k: v for k, v in space.uniform_params(space.low).items() if "/" not in k}
    for label, scale in (("bounds", 1.0), ("half bounds", 0.5)):
        params: dict[str, object] = {}
        for unit in space.units:
            entry = bounds.get(unit.name, {})
            if unit.removal:
                params[f"{unit.name}/remove"] = bool(entry.get("remove", False)) and scale == 1.0
                continue
            by_method = {m: float(b) for m, b in dict(entry.get("by_method", {})).items() if m in unit.methods}
            method = str(entry.get("method", ""))
            if method not in by_method:  # the space changed since: the best method it still offers
                method = max(by_method, key=by_method.__getitem__) if by_method else unit.methods[0]
            bound = by_method.get(method, 0.0)
            if len(unit.methods) > 1:
                params[f"{unit.name}/method"] = method
            params[f"{unit.name}/sparsity"] = _snap(space, bound * scale)
        params.update(trial_wide)
        if all(params != earlier for _, earlier in seeds):
            seeds.append((f"sensitivity {label}{tolerance}", params))
    return seeds


def seed_trials(config: SearchConfig, space: SearchSpace) -> list[tuple[str, dict[str, object]]]:
    """Seeds for a new study from ``<work_dir>/sensitivity.json``; none if it is absent or unusable.

    An unusable file (unreadable, another model or data config, no unit in
    common with the space) is skipped with a warning: seeds are a head start,
    never a reason to stop a search.
    """
    path = config.work_path / SENSITIVITY_FILE
    if not path.is_file():
        return []
    try:
        bounds, max_drop = read_bounds(config, space)
    except ValueError as exc:
        log.warning("%s: not used to seed the study (%s)", path, exc)
        return []
    return seed_params(space, bounds, max_drop)


def read_bounds(config: SearchConfig, space: SearchSpace) -> tuple[dict[str, dict[str, Any]], float]:
    """The per-unit bounds and max drop of ``<work_dir>/sensitivity.json``.

    Raises ``ValueError`` saying why the file cannot be used (absent, unreadable,
    measured on another model or data config, no unit in common with ``space``).
    """
    path = config.work_path / SENSITIVITY_FILE
    try:
        data = json.loads(path.read_text())
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {data.get('version')!r}, expected {FORMAT_VERSION}")
        bounds = data["bounds"]
        max_drop = float(data["max_drop"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}; run 'autoprune sensitivity' first") from None
    if data.get("fingerprint") != fingerprint(config):
        raise ValueError(f"{path} was measured with another model/data config; rerun 'autoprune sensitivity'")
    if not any(unit.name in bounds for unit in space.units):
        raise ValueError(f"{path} has no unit in common with the search space")
    return bounds, max_drop


def unit_highs(bounds: Mapping[str, Mapping[str, Any]], margin: float) -> dict[str, float]:
    """Per-unit upper sparsity: the bound measured without fine-tuning plus ``margin``, since
    fine-tuning recovers part of the loss (removable blocks keep their yes/no choice)."""
    return {unit: float(entry["sparsity"]) + margin for unit, entry in bounds.items() if "sparsity" in entry}


# ---- output ----
def figure(result: SensitivityResult) -> Any:
    """A matplotlib figure: one panel per method, accuracy (or perplexity, on a log scale) against sparsity,
    one line per unit, and the tolerance's line."""
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(c.method for c in result.curves))
    fig = Figure(figsize=(5.5 * max(1, len(methods)), 4.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(methods)), squeeze=False)[0]
    lower_is_better = result.metric == "perplexity"
    if lower_is_better:
        floor, floor_label = result.dense_accuracy * (1.0 + result.max_drop), f"dense x {1.0 + result.max_drop:g}"
    else:
        floor, floor_label = result.dense_accuracy - result.max_drop, f"dense - {result.max_drop:g}"
    for ax, method in zip(axes, methods, strict=False):
        for curve in (c for c in result.curves if c.method == method):
            xs = [p.ratio for p in curve.points if p.accuracy is not None]
            ys = [p.accuracy for p in curve.points if p.accuracy is not None]
            label = curve.unit + (f" (bound {curve.bound:g})" if curve.family != "removal" else "")
            ax.plot(xs, ys, marker="o", label=label)
        ax.axhline(result.dense_accuracy, color="black", linewidth=1, label="dense")
        ax.axhline(floor, color="gray", linestyle="--", linewidth=1, label=floor_label)
        ax.set_title(f"{method} (no fine-tuning)")
        ax.set_xlabel("removal" if get_method(method).family == "removal" else "sparsity of the unit")
        ax.set_ylabel(f"validation {result.metric}")
        if lower_is_better:
            ax.set_yscale("log")  # one unit's perplexity may grow by orders of magnitude
        else:
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left" if lower_is_better else "lower left")
    fig.suptitle(f"Sensitivity of {result.study}: one unit pruned at a time")
    return fig


def _log_mlflow(workspace: Workspace, result: SensitivityResult, dense: nn.Module) -> str:
    """Artifacts ``sensitivity/sensitivity.{json,png}`` on the study's parent run (created if new)."""
    from .trial import measure_dense

    config, inputs = workspace.config, workspace.inputs
    tracker = workspace.tracker()
    parent = tracker.parent_run(config.study.name)
    created = parent is None
    if parent is None:
        baseline = measure_dense(dense, inputs.val_loader, inputs.settings)
        parent = tracker.start_parent(config.study.name, config.snapshot(), asdict(baseline))
    client = tracker.client
    client.log_dict(parent, result.to_json(), f"{ARTIFACT_DIR}/{SENSITIVITY_FILE}")
    client.log_figure(parent, figure(result), f"{ARTIFACT_DIR}/sensitivity.png")
    client.set_tag(parent, SENSITIVITY_ATTR, f"max_drop={result.max_drop:g}; bounds in "
                                             f"{ARTIFACT_DIR}/{SENSITIVITY_FILE}")
    if created:
        tracker.finish_parent(parent, "FINISHED")
    return parent


def _study_exists(config: SearchConfig) -> bool:
    from .errors import StorageError
    from .storage import open_storage
    from .study import ensure_absent

    try:
        ensure_absent(open_storage(config.storage_url), config.study.name)
    except StorageError:
        return True
    return False


def run_sensitivity(source: SearchConfig | Workspace, ratios: Sequence[float] = DEFAULT_RATIOS,
                    methods: Sequence[str] | None = None, max_drop: float = DEFAULT_MAX_DROP, *,
                    log_mlflow: bool = True, on_progress: ProgressFn | None = None) -> SensitivityResult:
    """Measure the curves of a config's (or workspace's) search space, write ``sensitivity.json``, log to
    MLflow. ``max_drop``: the tolerated accuracy drop, or with ``model.task: causal_lm`` the tolerated
    relative perplexity increase (:func:`quality_drop`)."""
    from .training import to_device
    from .trial import make_context, on_device, trial_device
    from .workspace import Workspace

    workspace = source if isinstance(source, Workspace) else Workspace(source)
    config = workspace.config

    cap = config.space.max_layer_sparsity
    if any(r > cap for r in ratios):
        raise ConfigError(f"option '--ratios': {max(ratios):g} exceeds space.max_layer_sparsity={cap:g}; "
                          "lower the ratio or raise the cap")
    task = config.model.task
    if not 0.0 <= max_drop < 1.0:
        tolerance = "a relative perplexity increase" if task == "causal_lm" else "an accuracy drop"
        raise ConfigError(f"option '--max-drop': expected {tolerance} in [0, 1), got {max_drop}")
    unknown = [m for m in methods or () if m not in config.space.methods]
    if unknown:
        raise ConfigError(f"option '--method': {', '.join(unknown)} not among space.methods "
                          f"({', '.join(config.space.methods)})")
    started = time.perf_counter()
    inputs = workspace.inputs
    if log_mlflow:  # before anything is written: an unreachable store fails in seconds, creating nothing
        from .retry import check_reachable

        check_reachable(config.tracking_uri, "tracking.uri")
    config.work_path.mkdir(parents=True, exist_ok=True)
    if on_progress:
        on_progress(SensitivityProgress(0, 1, "dense model (pre-training once per study if configured)"))
    dense = workspace.dense()
    torch.manual_seed(config.study.seed)
    device = trial_device(inputs.settings)
    example = to_device(next(iter(inputs.val_loader))[0][:1], device)
    context = make_context(inputs.train_loader, inputs.settings, example)
    dense_accuracy, curves = measure_curves(on_device(dense, device), inputs.space, context, inputs.val_loader,
                                            ratios, methods, seed=config.study.seed, on_progress=on_progress,
                                            metric=inputs.settings.metric_fn,
                                            precision=inputs.settings.eval_precision, task=task)
    bounds = unit_bounds(inputs.space, curves, max_drop)
    used = [m for m in config.space.methods if any(c.method == m for c in curves)]
    result = SensitivityResult(config.study.name, dense_accuracy, [0.0, *[r for r in ratios if r > 0]], max_drop,
                               used, curves, bounds, fingerprint(config), metric=_metric_name(task))
    result.seeds = seed_params(inputs.space, bounds, max_drop)
    result.seconds = time.perf_counter() - started
    result.path = config.work_path / SENSITIVITY_FILE
    result.path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if log_mlflow:
        result.parent_run_id = _log_mlflow(workspace, result, dense)
    result.study_exists = _study_exists(config)
    return result
