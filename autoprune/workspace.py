"""One configured search on disk: its config and inputs, the study's files, its stores.

Everything that turns "this config" into "these files and databases" lives here, so that the search
loop, the MLflow report, the sensitivity analysis, export and the Python API share one answer:

- ``<work_dir>/optuna.db``, ``mlflow.db``, ``autoprune.db``: the default stores (shared by the studies
  of one work dir), ``<work_dir>/artifacts``: MLflow's artifacts by default;
- ``<work_dir>/studies/<study>/``: the study's own files: ``dense.pt`` (pre-trained once),
  ``trials/NNNNN/`` (each complete trial's pruned model).

Constructing a :class:`Workspace` only stores its arguments; inputs are built and stores opened on
first use, and opening an existing study never creates a database.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import SearchConfig
from .errors import ConfigError, StorageError
from .live import Live
from .retry import safe_url, sqlite_file

if TYPE_CHECKING:
    import optuna
    from torch import nn

    from .inputs import Inputs
    from .space import SearchSpace
    from .tracking import Tracker


class Workspace:
    """A configured search: ``config`` plus, optionally, the model and data as Python objects."""

    def __init__(self, config: SearchConfig, live: Live | None = None) -> None:
        self.config = config
        self.live = live or Live()
        self._inputs: Inputs | None = None
        self._dense: nn.Module | None = None

    # ---- inputs ----
    @property
    def inputs(self) -> Inputs:
        """Model, data, space and trial settings, built (and checked) on first use."""
        if self._inputs is None:
            from .inputs import build_inputs

            self._inputs = build_inputs(self.config, self.live)
        return self._inputs

    def dense(self) -> nn.Module:
        """The trained dense model (pre-trained once per study when the config says so)."""
        if self._dense is None:
            from .inputs import ensure_dense

            self._dense = ensure_dense(self.config, self.inputs)
        return self._dense

    def study_space(self, study: optuna.Study) -> SearchSpace:
        """The search space ``study`` was made with: the config's, with the per-unit caps and the rules'
        allocations the study stored when it was created (a resume decodes its trials the same way)."""
        from .study import ALLOCATIONS_ATTR, UNIT_HIGH_ATTR

        space = self.inputs.space.with_unit_highs(study.user_attrs.get(UNIT_HIGH_ATTR) or {})
        allocations = study.user_attrs.get(ALLOCATIONS_ATTR)
        return space.with_allocations(allocations) if allocations else space

    # ---- files ----
    def trial_dir(self, number: int) -> Path:
        """Trial ``number``'s model files: ``<work_dir>/studies/<study>/trials/NNNNN``."""
        return self.config.trial_path(number)

    def dense_checkpoint(self) -> Path | None:
        """The file the dense model comes from: the configured checkpoint, or the one pre-trained for this study."""
        return self.config.checkpoint_path if self.config.model.pretrain is None else self.config.dense_path

    @property
    def artifact_location(self) -> str | None:
        """MLflow artifacts of a default (work-dir) store go under ``<work_dir>/artifacts``."""
        return None if self.config.tracking.uri else (self.config.work_path / "artifacts").as_uri()

    # ---- stores ----
    def tracker(self) -> Tracker:
        from .tracking import Tracker

        return Tracker(self.config.tracking_uri, self.config.experiment_name,
                       artifact_location=self.artifact_location)

    def require_study_database(self) -> None:
        """A missing SQLite study file is an error for what reads a study (opening it would create it)."""
        path = sqlite_file(self.config.storage_url)
        if path is not None and not path.is_file():
            raise StorageError(f"field 'study.storage': no study database at {path}; run the search first "
                               f"('autoprune run CONFIG')")

    def open_study(self) -> optuna.Study:
        """The config's existing study, creating nothing."""
        from .storage import open_storage
        from .study import load_study, make_sampler

        self.require_study_database()
        config = self.config
        return load_study(open_storage(config.storage_url), config.study.name,
                          make_sampler(config.study.sampler, config.study.seed))

    # ---- trial models ----
    def trial_digests(self, number: int, study: optuna.Study | None = None) -> dict[str, str]:
        """The digests of trial ``number``'s model files, as the study stored them when they were written."""
        study = study or self.open_study()
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not trials:
            raise ConfigError(f"option '--trial': study {self.config.study.name!r} in "
                              f"{safe_url(self.config.storage_url)} has no trial {number} (see 'autoprune front')")
        from .model_files import FILES_ATTR

        return dict(trials[0].user_attrs.get(FILES_ATTR) or {})

    def load_trial_model(self, number: int, study: optuna.Study | None = None) -> nn.Module:
        """The pruned, fine-tuned model of trial ``number``, after checking its files against the digests the
        study stored (a skeleton planted in the work dir would run code when unpickled)."""
        from . import model_files
        from .model_io import import_factory

        expected = self.trial_digests(number, study)
        if self.config.model.factory is not None:  # makes the model's class importable for unpickling
            import_factory(self.config.model.factory, self.config.base_dir, "model.factory")
        directory = self.trial_dir(number)
        if not model_files.has_model_files(directory):
            raise ConfigError(f"option '--trial': no model files for trial {number} in {directory} "
                              f"(only complete trials have models; see 'autoprune front')")
        return model_files.load_model(directory, expected)
