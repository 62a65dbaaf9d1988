"""MLflow bookkeeping: one experiment per study, a parent run per study, a child
run per trial, Pareto tags, front artifacts and Pareto models.

The only module that imports MLflow. It uses :class:`mlflow.MlflowClient` with
explicit run ids (never the fluent API's global active run), and is only called
from the driver process. Runs are found again by tags, so a resumed search
reuses the parent run and never logs a finished trial twice.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from .errors import StorageError
from .plan import Plan, TrialResult

STUDY_TAG = "autoprune.study"
ROLE_TAG = "autoprune.role"
TRIAL_TAG = "autoprune.trial"
PARETO_TAG = "pareto"
RANK_TAG = "pareto_rank"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{'a.b': 'value'}`` strings, for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def _batched(items: list[Any], size: int = 100) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Tracker:
    """MLflow runs of one study."""

    def __init__(self, tracking_uri: str, experiment: str, *, artifact_location: str | None = None) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=artifact_location)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StorageError(f"field 'tracking.uri': cannot use MLflow tracking store: {reason}") from None
        self._trial_runs: dict[int, str] = {}
        self._pareto: dict[int, str] = {}
        self._rank: dict[int, str] = {}

    # ---- parent run ----
    def parent_run(self, study_name: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{study_name}' and tags.`{ROLE_TAG}` = 'study'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def start_parent(self, study_name: str, snapshot: Mapping[str, Any], dense: Mapping[str, float]) -> str:
        """The study's parent run, created with the config and the dense baseline if new."""
        existing = self.parent_run(study_name)
        if existing:
            self.client.update_run(existing, status="RUNNING")
            self._load_children(existing)
            return existing
        run = self.client.create_run(self.experiment_id, run_name=study_name,
                                     tags={STUDY_TAG: study_name, ROLE_TAG: "study"})
        run_id = run.info.run_id
        params = [Param(k, v[:MAX_PARAM_LENGTH]) for k, v in flatten(snapshot).items()]
        metrics = [Metric(f"dense_{k}", float(v), _now(), 0) for k, v in dense.items()]
        for chunk in _batched(params):
            self.client.log_batch(run_id, params=chunk)
        self.client.log_batch(run_id, metrics=metrics)
        self.client.log_dict(run_id, dict(snapshot), "config.json")
        return run_id

    def finish_parent(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def _load_children(self, parent_id: str) -> None:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                       max_results=50000)
        for run in runs:
            if TRIAL_TAG in run.data.tags and run.info.status in ("FINISHED", "FAILED"):
                number = int(run.data.tags[TRIAL_TAG])
                self._trial_runs[number] = run.info.run_id
                self._pareto[number] = run.data.tags.get(PARETO_TAG, "")
                self._rank[number] = run.data.tags.get(RANK_TAG, "")

    # ---- child runs ----
    def has_trial(self, number: int) -> bool:
        return number in self._trial_runs

    def log_trial(self, parent_id: str, study_name: str, number: int, plan: Plan,
                  result: TrialResult | None, reason: str | None, extra_tags: Mapping[str, str] = ()) -> str:
        """A finished child run for trial ``number`` (skipped if one exists already)."""
        if number in self._trial_runs:
            return self._trial_runs[number]
        tags = {PARENT_TAG: parent_id, STUDY_TAG: study_name, TRIAL_TAG: str(number), ROLE_TAG: "trial",
                "state": "COMPLETE" if result else "FAIL", **dict(extra_tags)}
        if reason:
            tags["fail_reason"] = reason[:5000]
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number:04d}", tags=tags)
        run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in plan.as_params().items()]
        for chunk in _batched(params):
            self.client.log_batch(run_id, params=chunk)
        if result:
            metrics = [Metric(k, v, _now(), 0) for k, v in result.as_metrics().items()]
            self.client.log_batch(run_id, metrics=metrics)
        self.client.log_table(run_id, _plan_table(plan), "plan.json")
        self.client.set_terminated(run_id, status="FINISHED" if result else "FAILED")
        self._trial_runs[number] = run_id
        return run_id

    def trial_run(self, number: int) -> str | None:
        return self._trial_runs.get(number)

    # ---- Pareto front ----
    def tag_pareto(self, front: Mapping[int, int]) -> list[int]:
        """Set ``pareto`` (and ``pareto_rank``) on every trial run whose flag changed.

        ``front`` maps trial number -> Pareto rank (0 = on the front) for every
        complete trial. Returns the numbers whose tag changed.
        """
        changed = []
        for number, run_id in self._trial_runs.items():
            if number not in front:
                continue
            flag, rank = ("true" if front[number] == 0 else "false"), str(front[number])
            if self._pareto.get(number) != flag:
                self.client.set_tag(run_id, PARETO_TAG, flag)
                changed.append(number)
            if self._rank.get(number) != rank:
                self.client.set_tag(run_id, RANK_TAG, rank)
            self._pareto[number], self._rank[number] = flag, rank
        return changed

    def log_front(self, parent_id: str, csv_text: str, chart_html: str | None, summary: Mapping[str, float]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pareto_front.csv"
            path.write_text(csv_text)
            self.client.log_artifact(parent_id, str(path))
            if chart_html is not None:
                chart = Path(tmp) / "pareto_front.html"
                chart.write_text(chart_html)
                self.client.log_artifact(parent_id, str(chart))
        self.client.log_batch(parent_id, metrics=[Metric(k, float(v), _now(), 0) for k, v in summary.items()])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)


def _plan_table(plan: Plan) -> dict[str, list[Any]]:
    return {
        "layer": [item.layer for item in plan.layers],
        "method": [item.method for item in plan.layers],
        "sparsity": [item.sparsity for item in plan.layers],
    }


def _now() -> int:
    return int(time.time() * 1000)
