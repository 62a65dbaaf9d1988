"""What the driver records about a running study in MLflow: a child run per
finished trial, Pareto tags kept right as the front moves, and the front's
artifacts on the parent run. Glue between the study (Optuna) and the tracker
(MLflow); neither of those modules knows the other.
"""

from __future__ import annotations

from collections.abc import Mapping

import optuna
from optuna.trial import TrialState

from . import pareto
from .plan import Plan, TrialResult
from .space import SearchSpace
from .study import BASELINE_ATTR, REASON_ATTR
from .tracking import Tracker
from .trial import DenseBaseline


class StudyReport:
    """MLflow records of one study, updated by the driver after every trial."""

    def __init__(self, tracker: Tracker, parent_id: str, study_name: str, baseline: DenseBaseline) -> None:
        self.tracker = tracker
        self.parent_id = parent_id
        self.study_name = study_name
        self.baseline = baseline

    def trial_finished(self, study: optuna.Study, number: int, plan: Plan, user_attrs: Mapping[str, object],
                       result: TrialResult | None, reason: str | None) -> int:
        """Log trial ``number`` and re-tag the front; returns the front's size."""
        extra_tags = {"baseline": str(user_attrs[BASELINE_ATTR])} if BASELINE_ATTR in user_attrs else {}
        self.tracker.log_trial(self.parent_id, self.study_name, number, plan, result, reason, extra_tags)
        ranks = pareto.ranks(pareto.complete_trials(study))
        self.tracker.tag_pareto(ranks)
        return sum(1 for rank in ranks.values() if rank == 0)

    def log_missing(self, study: optuna.Study, space: SearchSpace) -> None:
        """After a crash between Optuna's tell and MLflow's log, log the finished trials MLflow lacks."""
        fields = [name for name in TrialResult.__dataclass_fields__ if name != "extra"]
        for trial in study.get_trials(deepcopy=False):
            if self.tracker.has_trial(trial.number) or not trial.state.is_finished():
                continue
            plan = space.decode(trial.params) if trial.params else Plan(())
            if trial.state == TrialState.COMPLETE:
                result = TrialResult(**{k: trial.user_attrs[k] for k in fields})
                self.trial_finished(study, trial.number, plan, trial.user_attrs, result, None)
            elif trial.state == TrialState.FAIL:
                reason = str(trial.user_attrs.get(REASON_ATTR, "unknown"))
                self.trial_finished(study, trial.number, plan, trial.user_attrs, None, reason)

    def finalize(self, study: optuna.Study) -> list[dict]:
        """Front CSV, chart and summary metrics on the parent run; returns the front rows."""
        trials = pareto.complete_trials(study)
        rows = pareto.front_rows(trials)
        if trials:
            summary = {
                "front_size": len(rows),
                "hypervolume": pareto.hypervolume(trials, self.baseline.size_bytes, self.baseline.latency_ms),
                "completed_trials": len(trials),
            }
            self.tracker.log_front(self.parent_id, pareto.to_csv(rows), pareto.chart_html(study), summary)
        return rows

    def finish(self, status: str) -> None:
        self.tracker.finish_parent(self.parent_id, status)
