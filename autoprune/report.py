"""What the driver records about a study in MLflow: a child run per finished trial,
Pareto tags kept right as the front moves, the hypervolume history, and at the
end the front's views (chart, PNG, CSV, JSON, summary) on the parent run and an
MLflow model for each Pareto-optimal trial.

Glue between the study (Optuna) and the tracker (MLflow); neither of those
modules knows the other. ``autoprune report`` (:func:`regenerate`) runs the same
steps again on an existing study.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import charts, pareto
from .errors import AutopruneError
from .plan import FAILURE_KINDS, Plan, TrialFailure, TrialResult
from .space import SearchSpace
from .study import (
    BASELINE_ATTR,
    CONFIG_ATTR,
    DENSE_ATTR,
    EXTRA_ATTR,
    FAILURE_KIND_ATTR,
    REASON_ATTR,
    SEMI_STRUCTURED_ATTR,
    TRACEBACK_ATTR,
    WORKER_ATTR,
)
from .tracking import Tracker
from .trial import DenseBaseline

if TYPE_CHECKING:
    import torch

    from .workspace import Workspace

log = logging.getLogger(__name__)

HYPERVOLUME = "hypervolume"
FRONT_SIZE = "front_size"
FRONT_CSV, FRONT_JSON, CHART_HTML, CHART_PNG, SUMMARY_MD = (
    "pareto_front.csv", "pareto_front.json", "pareto_front.html", "pareto_front.png", "summary.md")
CSV_COLUMNS = (*pareto.FRONT_COLUMNS, "baseline", "plan")
ONNX_FILE = "model.onnx"  # beside a Pareto trial's MLflow model, with tracking.model_formats [torch, onnx]


@dataclass(frozen=True)
class ModelSource:
    """Where the Pareto models come from: trial number -> pruned model, and an input
    example (a few real samples) for the MLflow signature."""

    load: Callable[[int], torch.nn.Module]
    example: Any  # numpy array, a batch of >= 2 so the exported batch size stays dynamic; None: not a tensor
    code_paths: tuple[str, ...] = ()  # the user's model module, for models torch.export cannot trace
    expected: dict[int, Mapping[str, str]] = field(default_factory=dict)
    """Trial number -> the digests of its files stored in the study (``model_files.FILES_ATTR``), filled in by
    :meth:`StudyReport.finalize`; ``load`` refuses files that do not match them."""
    formats: tuple[str, ...] = ("torch",)
    """``tracking.model_formats``: with ``onnx``, each MLflow model carries ``model.onnx`` beside it."""
    check_batches: tuple[Any, ...] = ()
    """Validation batches the ONNX file is checked on in ONNX Runtime (:func:`autoprune.export.export_onnx`)."""


def model_source(workspace: Workspace) -> ModelSource | None:
    """The trial models of the workspace's study, with a validation batch as input example;
    None when ``tracking.log_models`` is off (no MLflow models are logged then)."""
    import torch

    if not workspace.config.tracking.log_models:
        return None

    from . import model_files

    inputs = workspace.inputs
    batch = next(iter(inputs.val_loader))[0]
    # MLflow models of a single-tensor input only; other inputs (dicts, tuples) get no model, with a reason
    example = batch[:2].detach().cpu().numpy() if isinstance(batch, torch.Tensor) else None
    expected: dict[int, Mapping[str, str]] = {}
    formats = tuple(workspace.config.tracking.model_formats)
    checks: tuple[Any, ...] = ()
    if "onnx" in formats:
        from itertools import islice

        from .export import CHECK_BATCHES

        checks = tuple(b[0] for b in islice(iter(inputs.val_loader), CHECK_BATCHES))
    return ModelSource(lambda number: model_files.load_model(workspace.trial_dir(number), expected.get(number, {})),
                       example, tuple(m.__file__ for m in inputs.modules if getattr(m, "__file__", None)), expected,
                       formats, checks)


def stored_failure(trial: FrozenTrial) -> TrialFailure | str:
    """A failed trial's failure as stored in the study: a :class:`TrialFailure`, or only its reason (a trial
    failed as stale, or by an older autoprune)."""
    reason = str(trial.user_attrs.get(REASON_ATTR, "unknown"))
    kind = trial.user_attrs.get(FAILURE_KIND_ATTR)
    if kind not in FAILURE_KINDS:
        return reason
    return TrialFailure(str(kind), reason, str(trial.user_attrs.get(TRACEBACK_ATTR, "")))


class StudyReport:
    """MLflow records of one study, updated by the driver after every trial."""

    def __init__(self, tracker: Tracker, parent_id: str, study_name: str, baseline: DenseBaseline, *,
                 space: SearchSpace | None = None, models: ModelSource | None = None) -> None:
        self.tracker = tracker
        self.parent_id = parent_id
        self.study_name = study_name
        self.baseline = baseline
        self.space = space
        self.models = models
        self.model_errors: dict[int, str] = {}
        self.models_logged: list[int] = []
        self._plans: dict[int, Plan] = {}
        self._logged_steps = tracker.metric_steps(parent_id, HYPERVOLUME)
        self._unknown: frozenset[int] = frozenset()

    # ---- during the search ----
    def trial_finished(self, study: optuna.Study, number: int, plan: Plan, user_attrs: Mapping[str, object],
                       result: TrialResult | None, failure: TrialFailure | str | None) -> int:
        """Log trial ``number``, re-tag the front, log the hypervolume; returns the front's size."""
        self._plans[number] = plan
        extra_tags = {"baseline": str(user_attrs[BASELINE_ATTR])} if BASELINE_ATTR in user_attrs else {}
        where = user_attrs.get(WORKER_ATTR)
        if isinstance(where, Mapping) and where.get("gpu_name"):  # the GPU the trial ran on (Ray's, or this process's)
            extra_tags["autoprune.gpu_name"] = str(where["gpu_name"])
        semi_structured = user_attrs.get(SEMI_STRUCTURED_ATTR)  # {layer: "N:M"}, on trials with N:M layers
        self.tracker.log_trial(self.parent_id, self.study_name, number, plan, result, failure, extra_tags,
                               semi_structured=semi_structured if isinstance(semi_structured, Mapping) else {})
        ranks = pareto.ranks(pareto.complete_trials(study))
        self._see_other_drivers(ranks)
        self.tracker.tag_pareto(ranks)
        self._log_history(study, only_trial=number)
        return sum(1 for rank in ranks.values() if rank == 0)

    def _see_other_drivers(self, ranks: Mapping[int, int]) -> None:
        """Complete trials this tracker has no run for were logged by another driver of the study
        (or are about to be): load their runs, so their Pareto tags are kept right too."""
        unknown = frozenset(n for n in ranks if not self.tracker.has_trial(n))
        if unknown and unknown != self._unknown:
            self.tracker.refresh(self.parent_id)
        self._unknown = unknown

    def log_missing(self, study: optuna.Study, space: SearchSpace) -> None:
        """After a crash between Optuna's tell and MLflow's log, log the finished trials MLflow lacks."""
        self.space = self.space or space
        fields = [name for name in TrialResult.__dataclass_fields__ if name != "extra"]
        for trial in study.get_trials(deepcopy=False):
            if self.tracker.has_trial(trial.number) or not trial.state.is_finished():
                continue
            plan = space.try_decode(trial.params) or Plan(())
            if trial.state == TrialState.COMPLETE:
                result = TrialResult(**{k: trial.user_attrs[k] for k in fields},
                                     extra=dict(trial.user_attrs.get(EXTRA_ATTR, {})))
                self.trial_finished(study, trial.number, plan, trial.user_attrs, result, None)
            elif trial.state == TrialState.FAIL:
                self.trial_finished(study, trial.number, plan, trial.user_attrs, None, stored_failure(trial))
        self._log_history(study)

    def _log_history(self, study: optuna.Study, only_trial: int | None = None) -> None:
        """Hypervolume and front size after each finished trial (step = finished trials so far).

        After a trial (``only_trial``) only its own step is logged, so drivers running the same
        study side by side never log one step twice; otherwise (resume, the end, ``autoprune
        report``) every step MLflow lacks is filled in.
        """
        if only_trial is None:
            self._logged_steps |= self.tracker.metric_steps(self.parent_id, HYPERVOLUME)
        points = pareto.history(study, self.baseline.size_bytes, self.baseline.latency_ms, skip=self._logged_steps,
                                only_trial=only_trial)
        if not points:
            return
        self.tracker.log_history(self.parent_id, [
            item for p in points
            for item in ((HYPERVOLUME, p.hypervolume, p.step, p.timestamp_ms),
                         (FRONT_SIZE, p.front_size, p.step, p.timestamp_ms))])
        self._logged_steps.update(p.step for p in points)

    # ---- at the end ----
    def finalize(self, study: optuna.Study) -> list[dict]:
        """Tags, history, the front's files and summary on the parent run, and an MLflow model
        per Pareto-optimal trial; returns the front rows (smallest first)."""
        trials = pareto.complete_trials(study)
        ranks = pareto.ranks(trials)
        self.tracker.refresh(self.parent_id)  # runs and tags other drivers wrote meanwhile
        self.tracker.tag_pareto(ranks)
        self._log_history(study)
        rows = pareto.front_rows(trials)
        if not trials:
            return rows
        views = self.views(study)
        self.tracker.log_files(self.parent_id, views.files)
        self.tracker.log_metrics(self.parent_id, {"completed_trials": len(trials), "failed_trials": views.failed})
        self.tracker.set_note(self.parent_id, views.files[SUMMARY_MD])
        if self.models is not None:  # the digests the driver stored with each trial's files
            from .model_files import FILES_ATTR

            self.models.expected.update({t.number: t.user_attrs.get(FILES_ATTR) or {} for t in trials})
        self.log_models([row["trial"] for row in rows])
        return rows

    def points(self, study: optuna.Study) -> list[charts.Point]:
        """Every complete trial as the views show it (rank, baseline label, plan summary)."""
        trials = pareto.complete_trials(study)
        ranks = pareto.ranks(trials)
        return [self._point(t, ranks[t.number]) for t in trials]

    def _point(self, trial: FrozenTrial, rank: int) -> charts.Point:
        plan = self._plans.get(trial.number)
        if plan is None and self.space is not None and trial.params:
            plan = self.space.try_decode(trial.params)  # None: params of an older space, no summary
        attrs = trial.user_attrs
        return charts.Point(
            trial=trial.number, accuracy=float(trial.values[0]), size_bytes=int(trial.values[1]),
            latency_ms=float(trial.values[2]), rank=rank, accuracy_drop=attrs.get("accuracy_drop"),
            param_sparsity=attrs.get("param_sparsity"),
            baseline=str(attrs[BASELINE_ATTR]) if BASELINE_ATTR in attrs else None,
            plan=charts.plan_summary(plan) if plan is not None else "",
            test_accuracy=attrs.get("test_accuracy"), feasible=pareto.feasible(trial))

    def views(self, study: optuna.Study) -> Views:
        """The parent run's files: CSV, JSON, interactive HTML, PNG and Markdown summary."""
        points = self.points(study)
        trials = pareto.complete_trials(study)
        hv = pareto.hypervolume(trials, self.baseline.size_bytes, self.baseline.latency_ms)
        failed = sum(1 for t in pareto.finished_in_order(study) if t.state == TrialState.FAIL)
        by_number = {p.trial: p for p in points}
        rows = []
        for row in pareto.front_rows(trials):
            p = by_number[row["trial"]]
            rows.append({**row, "baseline": p.baseline or "", "plan": p.plan})
        baselines = [{**pareto.trial_row(t), "baseline": by_number[t.number].baseline,
                      "on_front": by_number[t.number].on_front, "feasible": by_number[t.number].feasible}
                     for t in trials if by_number[t.number].baseline]
        front_size = sum(1 for p in points if p.on_front)
        latencies = (f"latencies are for {self.baseline.latency_device}, batch {self.baseline.latency_batch}, "
                     f"runtime {self.baseline.latency_runtime}")
        title = (f"{self.study_name}: {len(points)} complete trials, {front_size} on the Pareto front, "
                 f"hypervolume {hv:.4f}; {latencies}")
        document = {"study": self.study_name, "dense": asdict(self.baseline), "hypervolume": hv,
                    "accuracy_split": "validation", "test_split": any(p.test_accuracy is not None for p in points),
                    "complete_trials": len(points), "failed_trials": failed, "front": rows, "baselines": baselines}
        files: dict[str, str | bytes] = {
            FRONT_CSV: pareto.to_csv(rows, CSV_COLUMNS),
            FRONT_JSON: pareto.to_json(document),
            CHART_HTML: charts.html(points, self.baseline, title),
            CHART_PNG: charts.png(points, self.baseline, title),
            SUMMARY_MD: charts.summary_markdown(self.study_name, points, self.baseline, failed=failed,
                                                hypervolume=hv) + f"\n_{latencies.capitalize()}._\n",
        }
        return Views(files, rows, points, hv, failed)

    def log_models(self, numbers: Sequence[int]) -> list[int]:
        """An MLflow model for each trial in ``numbers`` that has none yet; returns those logged.

        A model that cannot be logged is reported (warning, ``model_errors``), never raised:
        the study's records matter more than one model.
        """
        if self.models is None:
            return []
        logged = []
        for number in numbers:
            if self.tracker.model_id(number) or not self.tracker.has_trial(number):
                continue
            try:
                if self.models.example is None:
                    raise TypeError("the model's input is not a single tensor: no MLflow model (log it yourself "
                                    "from 'autoprune export')")
                model = self.models.load(number)
                self.tracker.log_model(number, model, self.models.example, code_paths=self.models.code_paths,
                                       tags={"autoprune.study": self.study_name},
                                       extra_files=self._onnx_file(number, model))
                logged.append(number)
                self.models_logged.append(number)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                self.model_errors[number] = reason
                log.warning("could not log trial %d's model to MLflow: %s", number, reason)
        return logged

    def _onnx_file(self, number: int, model: torch.nn.Module) -> dict[str, bytes]:
        """``{"model.onnx": bytes}`` when ``tracking.model_formats`` asks for ONNX (the file checked in ONNX
        Runtime on validation batches), else nothing. A model that does not export is still logged, without
        the file; the reason goes to ``model_errors`` and the log."""
        if self.models is None or "onnx" not in self.models.formats:
            return {}
        import tempfile
        from pathlib import Path

        from .export import export_onnx

        try:
            with tempfile.TemporaryDirectory() as tmp:
                report = export_onnx(model, list(self.models.check_batches), Path(tmp) / ONNX_FILE,
                                     what=f"trial {number}'s model")
                return {ONNX_FILE: report.path.read_bytes()}
        except Exception as exc:
            reason = f"{ONNX_FILE}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.model_errors[number] = reason
            log.warning("trial %d's MLflow model is logged without %s: %s", number, ONNX_FILE, reason)
            return {}

    def finish(self, status: str) -> None:
        self.tracker.finish_parent(self.parent_id, status)


@dataclass
class Views:
    files: dict[str, str | bytes]
    front: list[dict[str, Any]]
    points: list[charts.Point]
    hypervolume: float
    failed: int


# ---- autoprune report ----
@dataclass
class Regenerated:
    experiment_id: str
    parent_run_id: str
    created_parent: bool
    files: list[str]
    front: list[dict[str, Any]]
    models_logged: list[int]
    model_errors: dict[int, str]
    registered: list[tuple[int, str]] = field(default_factory=list)


def regenerate(workspace: Workspace, *, register: str | None = None) -> Regenerated:
    """Bring an existing study's MLflow records up to date: missing child runs, Pareto tags,
    hypervolume history, every parent-run file, and the Pareto trials' models (optionally
    registered as versions of registered model ``register``). Creates no study."""
    config = workspace.config
    study = workspace.open_study()
    stored = study.user_attrs.get(DENSE_ATTR)
    if not stored:
        raise AutopruneError(f"study {config.study.name!r} has no dense baseline yet (it never ran a trial): "
                             f"nothing to report")
    baseline = DenseBaseline(**stored)
    tracker = workspace.tracker()
    parent = tracker.open_parent(config.study.name)
    created = parent is None
    if parent is None:
        parent = tracker.start_parent(config.study.name, study.user_attrs.get(CONFIG_ATTR) or config.snapshot(),
                                      asdict(baseline))
    space = workspace.study_space(study)
    report = StudyReport(tracker, parent, config.study.name, baseline, space=space, models=model_source(workspace))
    report.log_missing(study, space)
    rows = report.finalize(study)
    if created:
        report.finish("FINISHED")
    registered = []
    if register:
        registered = tracker.register(register, [row["trial"] for row in rows if tracker.model_id(row["trial"])])
    files = [FRONT_CSV, FRONT_JSON, CHART_HTML, CHART_PNG, SUMMARY_MD] if rows else []
    return Regenerated(tracker.experiment_id, parent, created, files, rows, list(report.models_logged),
                       dict(report.model_errors),
                       registered)
