"""Pareto front, ranks, hypervolume and the front chart, from Optuna's own tools.

Optuna keeps its non-dominated sort and hypervolume in private modules; they are
wrapped here, in one place, so an Optuna upgrade touches one file.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume
from optuna.study._multi_objective import _fast_non_domination_rank
from optuna.trial import FrozenTrial, TrialState

FRONT_COLUMNS = ("trial", "accuracy", "accuracy_drop", "size_bytes", "latency_ms", "params",
                 "nonzero_params", "macs", "param_sparsity")


def _losses(trials: Sequence[FrozenTrial]) -> np.ndarray:
    """Objective values turned into 'lower is better' (accuracy negated)."""
    return np.array([[-t.values[0], t.values[1], t.values[2]] for t in trials], dtype=float)


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def ranks(trials: Sequence[FrozenTrial]) -> dict[int, int]:
    """Trial number -> non-domination rank (0 = Pareto-optimal)."""
    if not trials:
        return {}
    values = _fast_non_domination_rank(_losses(trials))
    return {t.number: int(r) for t, r in zip(trials, values, strict=False)}


def front_rows(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """The Pareto-optimal trials as table rows, smallest first."""
    rank = ranks(trials)
    rows = []
    for trial in trials:
        if rank[trial.number] != 0:
            continue
        row: dict[str, Any] = {"trial": trial.number}
        for column in FRONT_COLUMNS[1:]:
            row[column] = trial.user_attrs.get(column)
        for column in ("params", "nonzero_params", "macs"):
            row[column] = int(row[column]) if row[column] is not None else None
        row["accuracy"], row["size_bytes"], row["latency_ms"] = trial.values[0], int(trial.values[1]), \
            trial.values[2]
        rows.append(row)
    return sorted(rows, key=lambda r: (r["size_bytes"], r["latency_ms"]))


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(FRONT_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def hypervolume(trials: Sequence[FrozenTrial], dense_size: float, dense_latency: float) -> float:
    """Hypervolume of the front in normalised space: accuracy in [0, 1], size and
    latency as fractions of the dense model's, reference point (accuracy 0,
    1.0x dense size, 1.0x dense latency). 1.0 would be a perfect, free model."""
    if not trials:
        return 0.0
    losses = _losses(trials) / np.array([1.0, dense_size, dense_latency])
    reference = np.array([0.0, 1.0, 1.0])
    inside = losses[np.all(losses < reference, axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(compute_hypervolume(inside, reference))


def chart_html(study: optuna.Study) -> str:
    """A self-contained interactive 3-D Pareto chart (plotly.js embedded, works offline)."""
    figure = optuna.visualization.plot_pareto_front(
        study, target_names=["accuracy", "size (bytes)", "latency (ms)"])
    return figure.to_html(include_plotlyjs=True, full_html=True)
