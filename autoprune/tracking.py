"""MLflow bookkeeping: one experiment per study, a parent run per study, a child
run per trial, Pareto tags, front artifacts and Pareto models.

The only module that imports MLflow. It uses :class:`mlflow.MlflowClient` with
explicit run ids (never the fluent API's global active run), and is only called
from the driver process. Runs are found again by tags, so a resumed search
reuses the parent run and never logs a finished trial twice.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from .crashpoints import crash_point
from .errors import StorageError
from .plan import Plan, TrialFailure, TrialResult
from .retry import call_with_retries, check_reachable, first_line, mask_urls, safe_url, store_lock

# MLflow announces each table it creates in a new store at INFO level: noise next to a search's own output.
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)

STUDY_TAG = "autoprune.study"
ROLE_TAG = "autoprune.role"
TRIAL_TAG = "autoprune.trial"
PARETO_TAG = "pareto"
RANK_TAG = "pareto_rank"
MODEL_TAG = "autoprune.model_id"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
FAILURE_KIND_TAG = "autoprune.failure_kind"
DEVICE_TAG = "autoprune.device"  # a trial run's: where it trained (cpu / cuda), from its result's extra
LATENCY_DEVICE_TAG = "autoprune.latency_device"  # where its latency was timed
TRACEBACK_FILE = "traceback.txt"  # a failed trial run's artifact: the full traceback
SEMI_STRUCTURED_TAG = "autoprune.semi_structured"  # a trial run's N:M layers in short: "2:4 on 12 layers"
SEMI_STRUCTURED_FILE = "semi_structured.json"  # ...and in full, {layer: "N:M"}, as an artifact
MAX_PARAM_LENGTH = 6000
MAX_NOTE_LENGTH = 8000  # MLflow's limit on a tag value


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


class RetryingClient:
    """An :class:`MlflowClient` whose calls are retried with backoff while its database is unreachable
    (a restart), for at most :data:`~autoprune.retry.STORAGE_RETRY_S` seconds; other errors pass through."""

    def __init__(self, client: MlflowClient, tracking_uri: str) -> None:
        self._client = client
        self._uri = tracking_uri

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute) or name.startswith("_"):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            return call_with_retries(lambda: attribute(*args, **kwargs), self._uri, f"MLflow {name}")

        return call


class Tracker:
    """MLflow runs of one study."""

    def __init__(self, tracking_uri: str, experiment: str, *, artifact_location: str | None = None) -> None:
        check_reachable(tracking_uri, "tracking.uri")  # seconds, not MLflow's minutes of retries
        try:
            with store_lock(tracking_uri):  # one process at a time creates (migrates) a SQLite store
                self.client = RetryingClient(MlflowClient(tracking_uri=tracking_uri), tracking_uri)
                found = self.client.get_experiment_by_name(experiment)
                self.experiment_id = found.experiment_id if found else self.client.create_experiment(
                    experiment, artifact_location=artifact_location)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"field 'tracking.uri': cannot use MLflow tracking store {safe_url(tracking_uri)}: "
                               f"{mask_urls(first_line(exc, tracking_uri))}") from None
        self._trial_runs: dict[int, str] = {}
        self._pareto: dict[int, str] = {}
        self._rank: dict[int, str] = {}
        self._models: dict[int, str] = {}

    # ---- parent run ----
    def parent_run(self, study_name: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STUDY_TAG}` = '{study_name}' and tags.`{ROLE_TAG}` = 'study'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def open_parent(self, study_name: str) -> str | None:
        """The study's existing parent run (its status untouched), with its children loaded."""
        existing = self.parent_run(study_name)
        if existing:
            self._load_children(existing)
        return existing

    def refresh(self, parent_id: str) -> None:
        """Load the child runs (and their tags) that other drivers of the study logged meanwhile."""
        self._load_children(parent_id)

    def start_parent(self, study_name: str, snapshot: Mapping[str, Any], dense: Mapping[str, float]) -> str:
        """The study's parent run, created with the config and the dense baseline if new."""
        existing = self.open_parent(study_name)
        if existing:
            self.client.update_run(existing, status="RUNNING")
            return existing
        words = {f"autoprune.dense_{k}": v for k, v in dense.items() if isinstance(v, str)}  # latency device
        run = self.client.create_run(self.experiment_id, run_name=study_name,
                                     tags={STUDY_TAG: study_name, ROLE_TAG: "study", **words})
        run_id = run.info.run_id
        params = [Param(k, v[:MAX_PARAM_LENGTH]) for k, v in flatten(snapshot).items()]
        metrics = [Metric(f"dense_{k}", float(v), _now(), 0) for k, v in dense.items()
                   if v is not None and not isinstance(v, str)]
        for chunk in _batched(params):
            self.client.log_batch(run_id, params=chunk)
        self.client.log_batch(run_id, metrics=metrics)
        self.client.log_dict(run_id, dict(snapshot), "config.json")
        return run_id

    def finish_parent(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
        crash_point("mlflow.parent_ended")

    def _load_children(self, parent_id: str) -> None:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                       max_results=50000)
        for run in runs:
            if TRIAL_TAG in run.data.tags and run.info.status in ("FINISHED", "FAILED"):
                number = int(run.data.tags[TRIAL_TAG])
                self._trial_runs[number] = run.info.run_id
                self._pareto[number] = run.data.tags.get(PARETO_TAG, "")
                self._rank[number] = run.data.tags.get(RANK_TAG, "")
                if MODEL_TAG in run.data.tags:
                    self._models[number] = run.data.tags[MODEL_TAG]

    # ---- child runs ----
    def has_trial(self, number: int) -> bool:
        return number in self._trial_runs

    def log_trial(self, parent_id: str, study_name: str, number: int, plan: Plan,
                  result: TrialResult | None, failure: TrialFailure | str | None,
                  extra_tags: Mapping[str, str] = (), semi_structured: Mapping[str, str] = ()) -> str:
        """A finished child run for trial ``number`` (skipped if one exists already); a failed one is tagged
        with its ``fail_reason`` and ``autoprune.failure_kind`` and carries its traceback as ``traceback.txt``.
        ``semi_structured`` (``{layer: "N:M"}``, the layers an N:M method pruned) is tagged in short
        (:func:`semi_structured_summary`, searchable in the runs table) and kept whole as ``semi_structured.json``."""
        if number in self._trial_runs:
            return self._trial_runs[number]
        semi_structured = dict(semi_structured)
        tags = {PARENT_TAG: parent_id, STUDY_TAG: study_name, TRIAL_TAG: str(number), ROLE_TAG: "trial",
                "state": "COMPLETE" if result else "FAIL", **dict(extra_tags)}
        if semi_structured:
            tags[SEMI_STRUCTURED_TAG] = semi_structured_summary(semi_structured)
        reason = failure.reason if isinstance(failure, TrialFailure) else failure
        if reason:
            tags["fail_reason"] = reason[:5000]
        if isinstance(failure, TrialFailure):
            tags[FAILURE_KIND_TAG] = failure.kind
        tags.update(_device_tags(result))
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number:04d}", tags=tags)
        run_id = run.info.run_id
        crash_point("mlflow.child_created")
        params = [Param(k, str(v)) for k, v in plan.as_params().items()]
        for chunk in _batched(params):
            self.client.log_batch(run_id, params=chunk)
        if result:
            metrics = [Metric(k, v, _now(), 0) for k, v in result.as_metrics().items()]
            self.client.log_batch(run_id, metrics=metrics)
        self.client.log_table(run_id, _plan_table(plan), "plan.json")
        if semi_structured:
            self.client.log_dict(run_id, semi_structured, SEMI_STRUCTURED_FILE)
        if isinstance(failure, TrialFailure) and failure.traceback:
            self.client.log_text(run_id, failure.traceback, TRACEBACK_FILE)
        crash_point("mlflow.child_logged")
        self.client.set_terminated(run_id, status="FINISHED" if result else "FAILED")
        self._trial_runs[number] = run_id
        crash_point("mlflow.child_ended")
        return run_id

    def drop_unfinished_trial_runs(self, parent_id: str) -> list[str]:
        """Delete the trial runs a killed driver left RUNNING (killed between MLflow's create_run and the
        end of its logging), so that the trial is logged again, once and whole, instead of twice."""
        runs = self.client.search_runs(
            [self.experiment_id], max_results=50000,
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'")
        dropped = [run.info.run_id for run in runs if TRIAL_TAG in run.data.tags]
        for run_id in dropped:
            self.client.delete_run(run_id)
        return dropped

    def drop_trial_runs_except(self, keep: Iterable[int]) -> list[int]:
        """Delete the loaded trial runs whose trial number is not in ``keep`` (the study's finished trials):
        runs the study has no trial for. Returns their trial numbers."""
        keep = set(keep)
        dropped = sorted(number for number in self._trial_runs if number not in keep)
        for number in dropped:
            self.client.delete_run(self._trial_runs.pop(number))
            for known in (self._pareto, self._rank, self._models):
                known.pop(number, None)
        return dropped

    def drop_unlinked_models(self, study_name: str) -> list[str]:
        """Delete the study's logged models that no trial run links to (a driver killed while logging one),
        so that the model is logged again instead of twice. Returns their ids."""
        linked = set(self._models.values())
        dropped = []
        models = self.client.search_logged_models([self.experiment_id], max_results=1000,
                                                  filter_string=f"tags.`{STUDY_TAG}` = '{study_name}'")
        for model in models:
            if model.model_id not in linked:
                self.client.delete_logged_model(model.model_id)
                dropped.append(model.model_id)
        return dropped

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
                crash_point("mlflow.tag")
                changed.append(number)
            if self._rank.get(number) != rank:
                self.client.set_tag(run_id, RANK_TAG, rank)
            self._pareto[number], self._rank[number] = flag, rank
        return changed

    # ---- parent run: front artifacts and histories ----
    def log_files(self, run_id: str, files: Mapping[str, str | bytes], artifact_path: str | None = None) -> None:
        """Write ``{name: content}`` as artifacts of ``run_id`` in one upload (replacing same-named ones)."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                path = Path(tmp) / name
                if isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(content, encoding="utf-8")
            self.client.log_artifacts(run_id, tmp, artifact_path)
        crash_point("mlflow.parent_files")

    def log_metrics(self, run_id: str, values: Mapping[str, float], step: int = 0) -> None:
        now = _now()
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def metric_steps(self, run_id: str, key: str) -> set[int]:
        """The steps already logged in the history of metric ``key``."""
        return {m.step for m in self.client.get_metric_history(run_id, key)}

    def log_history(self, run_id: str, points: Iterable[tuple[str, float, int, int]]) -> None:
        """Metric history points ``(key, value, step, timestamp_ms)``."""
        metrics = [Metric(key, float(value), timestamp, step) for key, value, step, timestamp in points]
        for chunk in _batched(metrics, 500):
            self.client.log_batch(run_id, metrics=chunk)
        crash_point("mlflow.history")

    def set_note(self, run_id: str, markdown: str) -> None:
        """The run's description in the MLflow UI (rendered as Markdown)."""
        if len(markdown) > MAX_NOTE_LENGTH:
            cut = "\n\n(cut here: see the artifact summary.md)\n"
            markdown = markdown[:MAX_NOTE_LENGTH - len(cut)].rsplit("\n", 1)[0] + cut
        self.client.set_tag(run_id, NOTE_TAG, markdown)

    # ---- Pareto models ----
    def model_id(self, number: int) -> str | None:
        """The MLflow model logged for trial ``number``, if any."""
        return self._models.get(number)

    def log_model(self, number: int, model: Any, input_example: Any, *, code_paths: Sequence[str] = (),
                  tags: Mapping[str, str] = (), extra_files: Mapping[str, bytes] = ()) -> str:
        """Log trial ``number``'s pruned model as an MLflow model (the ``mlflow.pytorch`` flavour,
        with signature and input example) on its child run; returns the model id.

        It is saved as ``pt2`` (``torch.export``), which loads with torch alone and without
        ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``; a model ``torch.export`` cannot trace is
        pickled instead, with the user's model code (``code_paths``) inside the model.
        ``extra_files`` (``{name: bytes}``, e.g. ``model.onnx``) are written beside it, in the model's
        artifacts; the model's tag ``autoprune.files`` lists them.
        """
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model, infer_signature

        run_id = self._trial_runs[number]
        model = model.eval()
        example = np.asarray(input_example)
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        signature = infer_signature(example, output)
        requirements = [f"torch=={torch.__version__.split('+')[0]}"]
        logged = self.client.create_logged_model(
            self.experiment_id, name=f"trial-{number:04d}", source_run_id=run_id,
            tags={TRIAL_TAG: str(number), **dict(tags)}, model_type="pruned")
        crash_point("mlflow.model_created")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model"
            meta = Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                         model_uuid=logged.model_id)
            try:
                mlflow.pytorch.save_model(model, str(path), mlflow_model=meta, signature=signature,
                                          input_example=example, pip_requirements=requirements,
                                          serialization_format="pt2")
                fmt = "pt2"
            except Exception:
                shutil.rmtree(path, ignore_errors=True)
                meta = Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                             model_uuid=logged.model_id)
                mlflow.pytorch.save_model(model, str(path), mlflow_model=meta, signature=signature,
                                          input_example=example, pip_requirements=[*requirements, "cloudpickle"],
                                          code_paths=list(code_paths) or None, serialization_format="pickle")
                fmt = "pickle"
            for name, content in dict(extra_files).items():
                (path / name).write_bytes(content)
            self.client.log_model_artifacts(logged.model_id, str(path))
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        files = {"autoprune.files": ",".join(extra_files)} if extra_files else {}
        self.client.set_logged_model_tags(logged.model_id, {"serialization_format": fmt, **files})
        self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, 0)])
        self.client.set_tag(run_id, MODEL_TAG, logged.model_id)
        self._models[number] = logged.model_id
        crash_point("mlflow.model_done")
        return logged.model_id

    def model_uri(self, number: int) -> str:
        """Where trial ``number``'s MLflow model lives; ``mlflow.pytorch.load_model`` takes it."""
        return self.client.get_logged_model(self._models[number]).artifact_location

    def register(self, name: str, numbers: Iterable[int]) -> list[tuple[int, str]]:
        """Register the models of trials ``numbers`` as versions of registered model ``name``
        (a model already registered there is skipped); returns ``(trial, version)`` pairs."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        # one model per trial run: a version already made from the run counts as registered
        known = {v.run_id: str(v.version) for v in self.client.search_model_versions(f"name = '{name}'")}
        versions = []
        for number in numbers:
            model_id, run_id = self._models[number], self._trial_runs[number]
            if run_id not in known:
                # The model's own location, not models:/<id>: MLflow resolves that through the global
                # tracking URI, not this client's.
                version = self.client.create_model_version(
                    name, source=self.client.get_logged_model(model_id).artifact_location,
                    run_id=run_id, model_id=model_id, tags={TRIAL_TAG: str(number)})
                known[run_id] = str(version.version)
            versions.append((number, known[run_id]))
        return versions

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)


def find_parent(tracking_uri: str, experiment: str, study_name: str) -> tuple[str, str] | None:
    """``(experiment id, parent run id)`` of a study, creating nothing; None if absent."""
    check_reachable(tracking_uri, "tracking.uri")
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{STUDY_TAG}` = '{study_name}' and tags.`{ROLE_TAG}` = 'study'", max_results=1)
    return (found.experiment_id, runs[0].info.run_id) if runs else None


def _device_tags(result: TrialResult | None) -> dict[str, str]:
    """Where a trial ran and was timed, from its result's ``extra`` (``on_cuda``, ``latency_on_cuda``: 0/1)."""
    if result is None or "on_cuda" not in result.extra:
        return {}
    tags = {DEVICE_TAG: "cuda" if result.extra["on_cuda"] else "cpu"}
    if "latency_on_cuda" in result.extra:
        tags[LATENCY_DEVICE_TAG] = "cuda" if result.extra["latency_on_cuda"] else "cpu"
    return tags


def semi_structured_summary(layers: Mapping[str, str]) -> str:
    """``{layer: "N:M"}`` in a few words, one count per pattern: ``"2:4 on 12 layers"``,
    ``"2:4 on 10 layers, 4:8 on 1 layer"``; empty for no layers."""
    counts: dict[str, int] = {}
    for pattern in layers.values():
        counts[pattern] = counts.get(pattern, 0) + 1
    return ", ".join(f"{pattern} on {n} layer{'s' if n != 1 else ''}" for pattern, n in sorted(counts.items()))


def _plan_table(plan: Plan) -> dict[str, list[Any]]:
    return {
        "layer": [item.layer for item in plan.layers],
        "method": [item.method for item in plan.layers],
        "sparsity": [item.sparsity for item in plan.layers],
    }


def _now() -> int:
    return int(time.time() * 1000)
