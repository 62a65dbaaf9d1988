"""Pareto front, ranks, hypervolume (and its history) and budget tables, from Optuna's own tools.

Optuna keeps its non-dominated sort and hypervolume in private modules; they are
wrapped here, in one place, so an Optuna upgrade touches one file. Objectives
are autoprune's fixed three: accuracy (max; or perplexity, min), size_bytes (min), latency_ms (min).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume
from optuna.study._multi_objective import _fast_non_domination_rank
from optuna.trial import FrozenTrial, TrialState

from .study import BASELINE_ATTR, OBJECTIVE_ATTR, STALE_ATTR

FRONT_COLUMNS = ("trial", "accuracy", "accuracy_drop", "test_accuracy", "size_bytes", "latency_ms", "params",
                 "nonzero_params", "macs", "param_sparsity", "finetune_epochs_spent")
"""``accuracy`` is on the validation data (what the front is selected on); ``test_accuracy`` on the data's
test split (empty without one); ``finetune_epochs_spent``: what the point cost (less than ``finetune.epochs``
for a plan that screening stopped early)."""


def score(trial: FrozenTrial) -> float:
    """The first objective as 'higher is better', in [0, 1] for the built-in metrics: accuracy itself; a
    minimized perplexity (>= 1; the trial carries ``OBJECTIVE_ATTR``) as its reciprocal, the geometric-mean
    probability of the right token, which orders trials the same way and keeps the hypervolume bounded."""
    value = trial.values[0]
    return 1.0 / value if trial.user_attrs.get(OBJECTIVE_ATTR) else value


def _losses(trials: Sequence[FrozenTrial]) -> np.ndarray:
    """Objective values turned into 'lower is better' (:func:`score` negated)."""
    return np.array([[-score(t), t.values[1], t.values[2]] for t in trials], dtype=float).reshape(-1, 3)


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def violation(trial: FrozenTrial) -> float:
    """How far a trial is over its ``space.constraints`` limits (sum of its positive constraint values,
    as Optuna's samplers count it); 0 for a feasible trial or one without constraints."""
    return float(sum(v for v in trial.constraints.values() if v > 0))


def feasible(trial: FrozenTrial) -> bool:
    return violation(trial) <= 0


def ranks(trials: Sequence[FrozenTrial]) -> dict[int, int]:
    """Trial number -> non-domination rank (0 = Pareto-optimal).

    Feasible trials are ranked among themselves; infeasible ones (over a ``space.constraints`` limit) come
    after all of them, ordered by how far over they are, and are never on the front (rank >= 1, also
    when no trial is feasible), as in Optuna's ``best_trials`` and constrained NSGA-II.
    """
    if not trials:
        return {}
    penalty = np.array([violation(t) for t in trials], dtype=float)
    infeasible = penalty > 0
    values = np.zeros(len(trials), dtype=int)
    if (~infeasible).any():
        values[~infeasible] = _fast_non_domination_rank(_losses([t for t in trials if violation(t) <= 0]))
    if infeasible.any():
        first = int(values[~infeasible].max()) + 1 if (~infeasible).any() else 1
        values[infeasible] = first + _fast_non_domination_rank(penalty[infeasible][:, np.newaxis])
    return {t.number: int(r) for t, r in zip(trials, values, strict=True)}


def front_rows(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """The Pareto-optimal trials as table rows, smallest first."""
    rank = ranks(trials)
    return sorted((trial_row(t) for t in trials if rank[t.number] == 0),
                  key=lambda r: (r["size_bytes"], r["latency_ms"]))


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """One complete trial as a row of :data:`FRONT_COLUMNS`."""
    row: dict[str, Any] = {"trial": trial.number}
    for column in FRONT_COLUMNS[1:]:
        row[column] = trial.user_attrs.get(column)
    for column in ("params", "nonzero_params", "macs"):
        row[column] = int(row[column]) if row[column] is not None else None
    row["accuracy"], row["size_bytes"], row["latency_ms"] = trial.values[0], int(trial.values[1]), trial.values[2]
    return row


def front_records(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """:func:`front_rows` with each trial's ``baseline`` label (or None) and its ``plan``: the sampled
    parameters, ``{"<unit>/sparsity": 0.5, "<unit>/method": ..., "schedule": ...}``, full values."""
    by_number = {t.number: t for t in trials}
    return [{**row, "baseline": by_number[row["trial"]].user_attrs.get(BASELINE_ATTR),
             "plan": dict(by_number[row["trial"]].params)} for row in front_rows(trials)]


def records_csv(records: Sequence[Mapping[str, Any]]) -> str:
    """:func:`front_records` as CSV: :data:`FRONT_COLUMNS`, ``baseline``, then one ``plan.<name>`` column per
    parameter (empty where a trial has none)."""
    names = sorted({name for record in records for name in record["plan"]})
    rows = [{**record, **{f"plan.{k}": v for k, v in record["plan"].items()}} for record in records]
    return to_csv(rows, [*FRONT_COLUMNS, "baseline", *(f"plan.{name}" for name in names)])


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = FRONT_COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


# ---- hypervolume ----
def hypervolume(trials: Sequence[FrozenTrial], dense_size: float, dense_latency: float) -> float:
    """Hypervolume of the front in normalised space: accuracy (or 1 / perplexity) in [0, 1], size and
    latency as fractions of the dense model's, reference point (accuracy 0,
    1.0x dense size, 1.0x dense latency). 1.0 would be a perfect, free model;
    trials no smaller or no faster than the dense model add nothing, nor do infeasible trials."""
    trials = [t for t in trials if feasible(t)]
    if not trials:
        return 0.0
    losses = _losses(trials) / np.array([1.0, dense_size, dense_latency])
    reference = np.array([0.0, 1.0, 1.0])
    inside = losses[np.all(losses < reference, axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(compute_hypervolume(inside, reference))


def finished_in_order(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count as finished (complete, or failed but not left by a stopped
    driver), in the order they finished: the steps of the hypervolume history."""
    far_future = dt.datetime.max
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
              if t.state == TrialState.COMPLETE or not t.user_attrs.get(STALE_ATTR)]
    return sorted(trials, key=lambda t: (t.datetime_complete or far_future, t.number))


@dataclass(frozen=True)
class HistoryPoint:
    step: int  # number of finished trials
    trial: int  # the trial whose end made this step
    hypervolume: float
    front_size: int
    timestamp_ms: int


def history(study: optuna.Study, dense_size: float, dense_latency: float,
            skip: Iterable[int] = (), only_trial: int | None = None) -> list[HistoryPoint]:
    """Hypervolume and front size after each finished trial (step = finished trials so far),
    leaving out the steps in ``skip`` (those already logged); only the step that trial
    ``only_trial`` made, if given."""
    skip = set(skip)
    points: list[HistoryPoint] = []
    complete: list[FrozenTrial] = []
    for step, trial in enumerate(finished_in_order(study), start=1):
        if trial.state == TrialState.COMPLETE:
            complete.append(trial)
        if step in skip or (only_trial is not None and trial.number != only_trial):
            continue
        front = sum(1 for r in ranks(complete).values() if r == 0)
        when = trial.datetime_complete or dt.datetime.now()
        points.append(HistoryPoint(step, trial.number, hypervolume(complete, dense_size, dense_latency), front,
                                   int(when.timestamp() * 1000)))
    return points
