"""autoprune as a library: a pruning search is an object, made like ``optuna.create_study``.

>>> import autoprune
>>> search = autoprune.Search(
...     {"study": {"name": "mine", "n_trials": 8}, "space": {"methods": ["l1_structured"]},
...      "execution": {"backend": "in_process"}},
...     model=trained_model, train_data=train_loader, val_data=val_loader)   # doctest: +SKIP
>>> search.run()                                    # doctest: +SKIP
>>> best = search.front()[0]; pruned = search.load_model(best.trial)   # doctest: +SKIP

The model and data may be Python objects (an ``nn.Module``; DataLoaders, or datasets batched with
``data.batch_size``) or the config's ``module:callable`` factories, as in a YAML file. The config
may be a YAML path, a mapping or a :class:`~autoprune.config.SearchConfig`. Every command of the
``autoprune`` CLI is one call here; ``examples/notebook_search.py`` runs one end to end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import SearchConfig, config_from_mapping, load_config
from .live import Live
from .workspace import Workspace

if TYPE_CHECKING:
    import optuna
    from torch import nn

    from .export import ExportReport
    from .loop import ProgressCallback
    from .report import Regenerated
    from .search import SearchSummary
    from .sensitivity import SensitivityResult

__all__ = ["Search", "TrialRecord", "load_search"]


@dataclass(frozen=True)
class TrialRecord:
    """One trial as users look at it: its objectives, counts and plan (from the study, no model loaded)."""

    trial: int
    state: str
    accuracy: float | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None
    accuracy_drop: float | None = None
    test_accuracy: float | None = None
    """On the test split (``test_data``, or the data factory's third loader); None without one."""
    params: int | None = None
    nonzero_params: int | None = None
    macs: int | None = None
    param_sparsity: float | None = None
    finetune_epochs_spent: float | None = None
    """What the trial's fine-tuning cost; below ``finetune.epochs`` where screening stopped it early."""
    on_front: bool = False
    baseline: str | None = None
    fail_reason: str | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    """Parameters Optuna sampled: ``<unit>/sparsity``, ``<unit>/method``, ``<block>/remove``, trial-wide choices."""


class Search:
    """A pruning search: a config, plus optionally the model and the data as Python objects.

    Constructing it validates the config (a :class:`~autoprune.errors.ConfigError` names the bad field)
    and stores the objects; the model and data are checked, and stores opened, when a method needs them.
    ``overrides`` are ``dotted.key=value`` strings, as ``--set`` on the command line.
    """

    def __init__(self, config: str | Path | Mapping[str, Any] | SearchConfig, *, model: nn.Module | None = None,
                 train_data: Any = None, val_data: Any = None, test_data: Any = None,
                 overrides: Sequence[str] = ()) -> None:
        self.config = _resolve(config, list(overrides))
        self._live = Live(model, train_data, val_data, test_data)
        self.test_data = test_data
        self._workspace = Workspace(self.config, self._live)

    # ---- running ----
    def run(self, n_trials: int | None = None, *, progress: ProgressCallback | None = None,
            debug: bool = False) -> SearchSummary:
        """Start the study (an error if it exists: use :meth:`resume`) and run it to ``n_trials``
        (default ``study.n_trials``). ``progress`` is called after every trial with a
        :class:`~autoprune.loop.Progress`. ``debug`` runs trials in this process and re-raises the first
        trial error with its traceback."""
        return self._search(n_trials, progress, resume=False, debug=debug)

    def resume(self, n_trials: int | None = None, *, progress: ProgressCallback | None = None,
               allow_changes: Sequence[str] = (), debug: bool = False) -> SearchSummary:
        """Continue the study (after a stop, a crash, or to add trials) up to ``n_trials`` in all.
        A config whose search space, model or data differ from the study's is refused, naming the fields,
        unless ``allow_changes`` lists them (``n_trials`` and execution settings may always change)."""
        return self._search(n_trials, progress, resume=True, allow_changes=allow_changes, debug=debug)

    def _search(self, n_trials: int | None, progress: ProgressCallback | None, **kwargs: Any) -> SearchSummary:
        from .search import run_search

        if n_trials is not None:
            self._set_trials(n_trials)
        workspace = self._workspace
        if kwargs.pop("debug", False):  # trials in this process; the first trial exception propagates
            execution = self.config.execution.model_copy(update={"backend": "in_process", "debug": True})
            workspace = Workspace(self.config.model_copy(update={"execution": execution}), self._live)
            workspace._inputs, workspace._dense = self._workspace._inputs, self._workspace._dense
        return run_search(workspace, on_progress=progress, **kwargs)

    def _set_trials(self, n_trials: int) -> None:
        if not isinstance(n_trials, int) or n_trials < 1:
            raise ValueError(f"n_trials: expected a positive integer, got {n_trials!r}")
        study = self.config.study.model_copy(update={"n_trials": n_trials})
        self.config = self.config.model_copy(update={"study": study})
        workspace = Workspace(self.config, self._live)
        workspace._inputs, workspace._dense = self._workspace._inputs, self._workspace._dense  # built once
        self._workspace = workspace

    # ---- looking at results ----
    @property
    def study(self) -> optuna.Study:
        """The Optuna study (its storage is the config's ``study.storage``); creates nothing."""
        return self._workspace.open_study()

    def trials(self) -> list[TrialRecord]:
        """Every trial of the study, by number."""
        from . import pareto
        from .study import BASELINE_ATTR, REASON_ATTR

        study = self.study
        front = {t.number for t in study.best_trials} if pareto.complete_trials(study) else set()
        records = []
        for trial in study.get_trials(deepcopy=False):
            row = pareto.trial_row(trial) if trial.values else {"trial": trial.number}
            records.append(TrialRecord(
                **row, state=trial.state.name, on_front=trial.number in front,
                baseline=trial.user_attrs.get(BASELINE_ATTR), fail_reason=trial.user_attrs.get(REASON_ATTR),
                plan=dict(trial.params)))
        return records

    def front(self) -> list[TrialRecord]:
        """The Pareto-optimal trials (accuracy up, size down, latency down), smallest first."""
        records = [r for r in self.trials() if r.on_front]
        return sorted(records, key=lambda r: (r.size_bytes, r.latency_ms))

    def front_frame(self) -> Any:
        """:meth:`front` as a pandas DataFrame (needs pandas), one row per trial, plan columns flattened."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("front_frame() needs pandas: pip install pandas") from None
        from dataclasses import asdict

        rows = []
        for record in self.front():
            row = asdict(record)
            row.update({f"plan.{k}": v for k, v in row.pop("plan").items()})
            rows.append(row)
        return pd.DataFrame(rows).set_index("trial") if rows else pd.DataFrame()

    def load_model(self, trial: int) -> nn.Module:
        """Trial ``trial``'s pruned, fine-tuned model (files checked against the study's digests)."""
        return self._workspace.load_trial_model(trial)

    def evaluate(self, trial: int, data: Any = None) -> float:
        """Trial ``trial``'s model scored with the search's metric on ``data`` (default: ``test_data``),
        data the front was not selected on."""
        from .inputs import _task_batches, as_loader
        from .measure import evaluate_task

        data = self.test_data if data is None else data
        if data is None:
            raise ValueError("evaluate(): no data: pass data=..., or test_data=... to Search")
        settings = self._workspace.inputs.settings
        loader = as_loader(data, self.config.data.batch_size, shuffle=False)
        loader = _task_batches(loader, settings.task == "causal_lm")  # ids alone are their own labels
        return evaluate_task(self.load_model(trial), loader, settings.task, settings.metric_fn)

    # ---- derived work ----
    def export(self, trial: int, path: str | Path, format: str | None = None) -> ExportReport:
        """Write trial ``trial``'s model as a ``torch.export`` file (``format="torch"``: loads with torch alone)
        or an ONNX file (``"onnx"``: dynamic batch, checked in ONNX Runtime on validation batches); default: from
        the suffix of ``path`` (``.onnx``: onnx). The report says the largest difference from the model."""
        from .export import export_trial

        return export_trial(self._workspace, trial, Path(path), format)

    def sensitivity(self, ratios: Sequence[float] = (0.25, 0.5, 0.75, 0.9), *, max_drop: float = 0.05,
                    methods: Sequence[str] | None = None, progress: Any = None) -> SensitivityResult:
        """Accuracy (perplexity for ``model.task: causal_lm``; then ``max_drop`` is a relative increase) against
        sparsity per unit and method, one unit pruned at a time, without fine-tuning;
        writes ``<work_dir>/sensitivity.json`` (a new study is seeded from it) and logs a plot to MLflow.
        ``progress`` is called with a :class:`~autoprune.sensitivity.SensitivityProgress` per point."""
        from .sensitivity import run_sensitivity

        return run_sensitivity(self._workspace, tuple(ratios), methods, max_drop, on_progress=progress)

    def report(self, register: str | None = None) -> Regenerated:
        """Bring the study's MLflow records up to date (runs, tags, chart, tables, models); optionally
        register the front's models as versions of registered model ``register``."""
        from .report import regenerate

        return regenerate(self._workspace, register=register)


def load_search(name: str, storage: str, *, model: nn.Module | None = None, train_data: Any = None,
                val_data: Any = None, test_data: Any = None) -> Search:
    """Reopen a study made by autoprune, like ``optuna.load_study``: its config comes from the study.
    Pass the model and data objects again if the search was started with objects instead of factories."""
    import optuna

    from .errors import StorageError
    from .retry import safe_url
    from .storage import open_storage
    from .study import BASE_DIR_ATTR, CONFIG_ATTR

    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:
        raise StorageError(f"no study {name!r} in {safe_url(storage)}") from None
    snapshot = study.user_attrs.get(CONFIG_ATTR)
    if not snapshot:
        raise StorageError(f"study {name!r} in {safe_url(storage)} holds no autoprune config: not made by autoprune")
    snapshot = {**snapshot, "study": {**snapshot["study"], "storage": storage}}  # the real URL, not the masked one
    base_dir = study.user_attrs.get(BASE_DIR_ATTR, str(Path.cwd()))
    config = config_from_mapping(snapshot, base_dir, source=f"study {name!r}")
    return Search(config, model=model, train_data=train_data, val_data=val_data, test_data=test_data)


def _resolve(config: str | Path | Mapping[str, Any] | SearchConfig, overrides: list[str]) -> SearchConfig:
    if isinstance(config, SearchConfig):
        return config_from_mapping(config.snapshot(), config.base_dir, overrides) if overrides else config
    if isinstance(config, str | Path):
        return load_config(config, overrides)
    if isinstance(config, Mapping):
        return config_from_mapping(config, Path.cwd(), overrides)
    raise TypeError(f"config: expected a YAML path, a mapping or a SearchConfig, got {type(config).__name__}")
