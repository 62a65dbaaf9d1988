"""The search config: a YAML file validated once, at the edge, by pydantic.

Every user-input check lives here. Unknown keys are rejected, and every error
names the file and the dotted field, what was expected and what was given.
Relative paths in a config (work_dir, checkpoint, factory modules) are resolved
against the directory of the config file, so a config and the module beside it
travel together.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import ConfigError

SAMPLERS = ("tpe", "nsga2", "nsga3", "random", "qmc", "gp")
OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_BASELINES = (0.25, 0.5, 0.75)
DEFAULT_UNSTRUCTURED_BASELINES = (0.5, 0.75, 0.9)
"""Unstructured rules zero single weights: at 0.5/0.75/0.9 they keep about the parameters that removing
0.25/0.5/0.75 of the channels leaves (1 - (1 - s)^2 = 0.44/0.75/0.94), so the rules meet at similar sizes."""
BASELINE_RULES = ("uniform", "global_magnitude", "global_structured", "owl")
"""The baseline rules a study can hold (``study.baseline_rules``; :mod:`autoprune.baselines`)."""
DEFAULT_BASELINE_RULES = ("uniform", "global_magnitude", "global_structured")
"""The rules of a study that names none: ``owl`` is asked for by name (it runs calibration batches through the
dense model and fits decoder LLMs), so studies made before it existed keep their baselines."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudyConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    storage: str | None = None
    """Optuna RDB URL; default: ``sqlite:///<work_dir>/optuna.db``."""
    n_trials: int = Field(20, ge=1)
    sampler: Literal[SAMPLERS] = "tpe"  # type: ignore[valid-type]
    seed: int = 0
    baselines: list[float] | None = None
    """Whole-model sparsities at which the baseline rules (``baseline_rules``) are enqueued first;
    default: those of 0.25, 0.5 and 0.75 inside ``space.sparsity``; ``[]`` for none."""
    baseline_rules: list[str] = Field(default_factory=lambda: list(DEFAULT_BASELINE_RULES))
    """Rules applied at each of ``baselines`` (see :mod:`autoprune.baselines`): ``uniform`` (with each of
    ``baseline_methods``), ``global_magnitude`` (needs an unstructured method), ``global_structured`` (needs a
    channel method), ``owl`` (outlier-weighted layer-wise sparsity for decoder LLMs: needs ``wanda``,
    ``sparsegpt``, ``l1_unstructured`` or ``l2_unstructured`` and calibration batches; with the ``global``
    parametrization also a rule of the compact space); default: ``[uniform, global_magnitude,
    global_structured]``, each where it applies."""
    baseline_methods: list[str] | None = Field(None, min_length=1)
    """The methods the ``uniform`` rule is applied with, one trial per method and sparsity (an N:M method:
    one trial, at its fixed sparsity); each must be one of ``space.methods``; default: the first of them.
    With ``space.parametrization: global`` each one but the first that takes any sparsity is also a rule of
    the compact space (``uniform_<method>``); N:M methods are skipped there (said in the log)."""
    db_url: str | None = None
    """autoprune's own database (registry of searches); default: ``sqlite:///<work_dir>/autoprune.db``."""

    @field_validator("name")
    @classmethod
    def _usable_as_directory(cls, value: str) -> str:
        # the study's files live in <work_dir>/studies/<name>/: the name must be one plain directory name
        if value == "." or ".." in value:
            raise ValueError(f"expected a name usable as a directory name (letters, digits, '_', '-', '.'; "
                             f"not '.' and without '..'), got {value!r}")
        return value

    @field_validator("baseline_rules")
    @classmethod
    def _known_rules(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in BASELINE_RULES]
        if unknown:
            raise ValueError(f"unknown baseline rule {unknown[0]!r}; known rules: {', '.join(BASELINE_RULES)}")
        if len(set(value)) != len(value):
            raise ValueError(f"expected each rule once, got {value}")
        return value

    @field_validator("baseline_methods")
    @classmethod
    def _distinct_methods(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"expected each method once, got {value}")
        return value


class PretrainConfig(_Strict):
    epochs: int = Field(5, ge=1)
    optimizer: Literal[OPTIMIZERS] = "adam"  # type: ignore[valid-type]
    lr: float = Field(1e-3, gt=0)


class ModelConfig(_Strict):
    factory: str | None = None
    """``module:callable`` returning the model; required unless the model is given as an object
    (``autoprune.Search(model=...)``)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path | None = None
    pretrain: PretrainConfig | None = None
    pretrained: bool = False
    """True: the factory returns an already trained model (no checkpoint, no pre-training)."""
    loss: str | None = None
    """``module:callable``, ``loss(outputs, targets) -> scalar tensor`` for pre-training, fine-tuning and
    gradient-based importance; default: cross-entropy on class indices."""
    metric: str | None = None
    """``module:callable``, ``metric(outputs, targets) -> per-sample scores [B]`` (higher is better), averaged
    over the validation set as the "accuracy" objective; default: top-1 accuracy (argmax over dim 1)."""
    task: Literal["classification", "causal_lm"] = "classification"
    """``causal_lm``: batches are ``(input_ids, labels)`` or ``input_ids`` alone (labels = the ids), the loss
    is the shifted next-token cross-entropy (unless ``model.loss``), and the first objective is validation
    perplexity, minimized (reported as ``perplexity``; ``model.metric`` does not apply)."""

    @field_validator("factory", "loss", "metric")
    @classmethod
    def _factory_format(cls, value: str | None) -> str | None:
        return None if value is None else _check_factory(value)

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sources = (self.checkpoint is not None) + (self.pretrain is not None) + self.pretrained
        if sources > 1 or (sources == 0 and self.factory is not None):  # a model object is trained as given
            raise ValueError("expected exactly one of 'checkpoint' or 'pretrain' (or 'pretrained: true')")
        return self


class DataConfig(_Strict):
    factory: str | None = None
    """``module:callable`` returning ``(train_loader, val_loader)``; required unless the data are given as
    objects (``autoprune.Search(train_data=..., val_data=...)``)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(64, ge=1)
    """Batch size for datasets given as objects (DataLoaders keep theirs)."""

    @field_validator("factory")
    @classmethod
    def _factory_format(cls, value: str | None) -> str | None:
        return None if value is None else _check_factory(value)


class SparsityRange(_Strict):
    low: float = Field(0.0, ge=0.0, lt=1.0)
    high: float = Field(0.9, ge=0.0, lt=1.0)
    step: float | None = Field(None, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> SparsityRange:
        if self.low > self.high:
            raise ValueError(f"expected low <= high, got low={self.low} and high={self.high}")
        return self


class ConstraintsConfig(_Strict):
    """Limits a trial must meet to be feasible (None: no limit). Infeasible trials stay in the study, are
    never on the front, and the sampler steers away from them (Optuna's ``Trial.set_constraint``)."""

    max_accuracy_drop: float | None = Field(None, ge=0.0, le=1.0)
    """Largest ``accuracy_drop`` (absolute: 0.01 = one point) against the better of the dense model and
    the dense model fine-tuned with the trials' budget."""
    max_size_fraction: float | None = Field(None, gt=0.0)
    """Largest size on disk as a fraction of the dense model's."""
    max_latency_fraction: float | None = Field(None, gt=0.0)
    """Largest latency as a fraction of the dense model's."""


class SpaceConfig(_Strict):
    methods: list[str] = Field(default_factory=lambda: ["l1_unstructured"], min_length=1)
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    head: str | None = None
    """Module protected from losing outputs; default: the last Linear/Conv layer."""
    sparsity: SparsityRange = SparsityRange()
    max_layer_sparsity: float = Field(0.95, gt=0.0, lt=1.0)
    round_to: int | None = Field(None, ge=1)
    calibration_batches: int = Field(2, ge=0)
    quantize: Literal["never", "search", "always"] = "never"
    """int8 dynamic quantization of Linear layers after fine-tuning: never, a yes/no search choice, or always."""
    sensitivity_bounds: bool = False
    """Cap each unit's sparsity at its bound in ``<work_dir>/sensitivity.json`` plus ``sensitivity_margin``
    (``autoprune sensitivity`` writes it); decided when the study is created, kept on resume."""
    sensitivity_margin: float = Field(0.1, ge=0.0, lt=1.0)
    schedules: list[Literal["oneshot", "iterative"]] = Field(default_factory=lambda: ["oneshot"], min_length=1)
    """Pruning schedules to choose from; more than one makes ``schedule`` a search choice."""
    iterative_rounds: int = Field(3, ge=2, le=100)
    """Prune/fine-tune rounds of the iterative schedule (cubic AGP sparsities; same total fine-tuning)."""
    rewind: Literal["never", "search", "always"] = "never"
    """Lottery-ticket rewinding: reset surviving weights to early values before fine-tuning."""
    rewind_epoch: int = Field(1, ge=0)
    """The rewind point: weights after this many epochs of ``model.pretrain`` (0: initial weights)."""
    rewind_checkpoint: Path | None = None
    """Early weights as a state_dict (instead of ``rewind_epoch``; needed with ``model.checkpoint``)."""
    constraints: ConstraintsConfig = ConstraintsConfig()
    """Feasibility limits on accuracy drop, size and latency (see :class:`ConstraintsConfig`)."""
    parametrization: Literal["per_unit", "global"] = "per_unit"
    """``per_unit``: a sparsity (and method) per unit. ``global``: a whole-model sparsity and a rule
    (uniform, global magnitude, global structured) whose allocation each unit shifts within
    ``allocation_spread`` (see :mod:`autoprune.space`)."""
    allocation_spread: float = Field(1.0, ge=0.0, le=5.0)
    """``global``: how far (log-odds) a unit's sparsity may move from its rule's allocation; 0: the rules only."""

    @field_validator("schedules")
    @classmethod
    def _unique_schedules(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"expected each schedule once, got {value}")
        return value

    @model_validator(mode="after")
    def _schedulable_methods(self) -> SpaceConfig:
        if "iterative" in self.schedules or self.rewind != "never":
            from .catalog import supports_iterative

            unsupported = [m for m in self.methods if not supports_iterative(m)]
            if unsupported:
                raise ValueError(f"methods {unsupported} support neither iterative schedules nor rewinding; "
                                 "use schedules: [oneshot] and rewind: never with them")
        if self.rewind_checkpoint is not None and self.rewind == "never":
            raise ValueError("rewind_checkpoint is given but rewind is 'never'")
        if self.allocation_spread != 1.0 and self.parametrization != "global":  # (snapshots list the default)
            raise ValueError(f"allocation_spread is {self.allocation_spread} but parametrization is not 'global'")
        return self

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        from .catalog import check_method

        for name in value:
            try:
                check_method(name)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if len(set(value)) != len(value):
            raise ValueError(f"expected each method once, got {value}")
        return value


class DistillConfig(_Strict):
    weight: float = Field(0.5, ge=0.0, le=1.0)
    """``loss = (1 - weight) * task loss + weight * distillation loss``."""
    temperature: float = Field(4.0, gt=0.0)
    """Softmax temperature T of the distillation term ``T^2 * KL`` (classification; MSE to the dense model's
    outputs with a user ``model.loss``)."""


class ScreeningConfig(_Strict):
    enabled: bool = False
    min_accuracy_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """A plan whose accuracy right after pruning is below this fraction of the dense accuracy is screened out."""
    short_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    """Fraction of the fine-tuning steps a screened-out plan gets (0: none)."""
    max_dominated: int | None = Field(None, ge=1)
    """Successive halving: every one-shot plan first gets ``short_fraction`` of the fine-tuning, and the rest
    only if fewer than this many earlier plans beat it then on both validation accuracy and non-zero
    parameters (and the accuracy threshold holds). None: screen on accuracy right after pruning only."""


class FinetuneConfig(_Strict):
    epochs: int = Field(1, ge=0)
    optimizer: Literal[OPTIMIZERS] = "adam"  # type: ignore[valid-type]
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_batches: int | None = Field(None, ge=1)
    lr_schedule: Literal["constant", "cosine", "onecycle"] = "constant"
    """Learning rate over each fine-tuning run, stepped per batch: constant, cosine decay to 0, or one-cycle."""
    distill: DistillConfig | None = None
    """Knowledge distillation from the dense model while fine-tuning; None: plain task loss."""
    bn_recalibration_batches: int = Field(4, ge=0)
    """Training batches to re-estimate BatchNorm statistics with after pruning, before fine-tuning (0: off);
    4 by benchmarks/recovery.py (better after 1 epoch, the same after 2)."""
    screening: ScreeningConfig = ScreeningConfig()
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Fine-tuning (and ``model.pretrain``) precision: fp32, or bf16 / fp16 autocast (fp16 with a gradient
    scaler; bf16 works on CPUs too). The weights stay fp32."""
    eval_precision: Literal["fp32", "bf16", "fp16"] | None = None
    """Precision of every evaluation (dense and trials alike); default: ``precision``."""


class LatencyConfig(_Strict):
    batch_size: int = Field(1, ge=1)
    threads: int = Field(1, ge=1)
    rounds: int = Field(5, ge=1)
    min_run_time: float = Field(0.05, gt=0)
    device: Literal["cpu", "cuda"] | None = None
    """Where latency is timed; default: the trial's device (``execution.device``). ``cpu`` times a model
    trained on a GPU for deployment on a CPU."""
    runtime: Literal["eager", "onnxruntime", "compiled"] = "eager"
    """What the models are timed in (the dense reference too): eager PyTorch, an ONNX Runtime session of the
    model exported to ONNX (CPU, ``threads`` intra-op threads; needs the ``deploy`` extra), or
    ``torch.compile``. The pruned models' latency ranking can differ between runtimes: time them in the one
    you deploy. int8-quantized plans do not export to ONNX today: with onnxruntime their trials fail."""

    @field_validator("runtime")
    @classmethod
    def _runtime_available(cls, value: str, info: ValidationInfo) -> str:
        if value == "onnxruntime":
            if info.data.get("device") == "cuda":
                raise ValueError("onnxruntime is timed on the CPU (its CPU execution provider): expected "
                                 "latency.device cpu (or unset) with it, got cuda")
            _require_deploy("latency.runtime: onnxruntime")
        return value


class ExecutionConfig(_Strict):
    backend: Literal["ray", "in_process"] = "ray"
    address: str | None = None
    """Existing Ray cluster address (``HOST:PORT`` or ``auto``); default: start a local Ray."""
    parallel: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    """GPUs each trial asks Ray for: a fraction (0.25: four trials share a GPU) or a whole number."""
    memory_per_trial_mb: int | None = Field(None, ge=1)
    max_retries: int = Field(0, ge=0)
    debug: bool = False
    """Re-raise the first exception a trial raises, with its traceback, instead of failing the trial
    (``autoprune run --debug``); needs ``backend: in_process``."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the dense model is pre-trained and measured and trials run: ``auto`` uses CUDA when a trial is
    given a GPU (``gpus_per_trial > 0`` and CUDA available), else the CPU; ``cuda`` fails trials where
    CUDA is missing."""

    @field_validator("gpus_per_trial")
    @classmethod
    def _gpu_share(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"expected a fraction of one GPU (0 < x <= 1; 0.25 runs four trials per GPU) or a "
                             f"whole number of GPUs, got {value}")
        return value

    @model_validator(mode="after")
    def _debug_in_process(self) -> ExecutionConfig:
        if self.debug and self.backend != "in_process":
            raise ValueError("debug: true needs backend: in_process (trials raise in this process)")
        if self.device == "cuda" and self.backend == "ray" and self.gpus_per_trial == 0:
            raise ValueError("field 'execution.device': 'cuda' on the Ray backend needs execution.gpus_per_trial "
                             "> 0 (Ray shows a task no GPU it did not ask for), got gpus_per_trial=0")
        return self


class TrackingConfig(_Strict):
    uri: str | None = None
    """MLflow tracking URI; default: ``sqlite:///<work_dir>/mlflow.db``."""
    experiment: str | None = None
    log_models: bool = True
    model_formats: list[Literal["torch", "onnx"]] = Field(default_factory=lambda: ["torch"])
    """What each Pareto trial's MLflow model carries: ``torch`` (the MLflow model itself, always) and, with
    ``onnx``, ``model.onnx`` beside it (checked in ONNX Runtime; needs the ``deploy`` extra)."""

    @field_validator("model_formats")
    @classmethod
    def _torch_first(cls, value: list[str]) -> list[str]:
        if "torch" not in value or len(set(value)) != len(value):
            raise ValueError("expected a list of distinct formats that includes torch (the MLflow model itself), "
                             "e.g. [torch] or [torch, onnx]")
        if "onnx" in value:
            _require_deploy("tracking.model_formats: [torch, onnx]")
        return value


def _require_deploy(what: str) -> None:
    """``what`` needs the ONNX packages: a clear error now rather than a failure in every trial."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"{what} needs {', '.join(missing)}: pip install 'autoprune[deploy]'")


class SearchConfig(_Strict):
    study: StudyConfig
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    work_dir: Path = Path("runs")
    space: SpaceConfig = SpaceConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    latency: LatencyConfig = LatencyConfig()
    execution: ExecutionConfig = ExecutionConfig()
    tracking: TrackingConfig = TrackingConfig()
    base_dir: Path = Path(".")
    """Directory of the config file; set by :func:`load_config`, not by users."""

    @model_validator(mode="after")
    def _baselines_in_range(self) -> SearchConfig:
        low, high = self.space.sparsity.low, self.space.sparsity.high
        for value in self.study.baselines or []:
            if not low <= value <= high:
                raise ValueError(f"field 'study.baselines': expected sparsities within space.sparsity "
                                 f"[{low}, {high}], got {value}")
        return self

    @model_validator(mode="after")
    def _baseline_methods_configured(self) -> SearchConfig:
        """``study.baseline_methods`` name methods the space prunes with, for the ``uniform`` rule: a method
        outside ``space.methods`` has no unit in the space, and one without the rule would go unused."""
        from .catalog import FAMILIES

        methods = self.study.baseline_methods
        if methods is None:
            return self
        for name in methods:
            if name not in self.space.methods:
                raise ValueError(f"field 'study.baseline_methods': method {name!r} is not among space.methods "
                                 f"({', '.join(self.space.methods)})")
            if FAMILIES.get(name) == "removal":
                raise ValueError(f"field 'study.baseline_methods': {name!r} removes whole blocks, so a uniform "
                                 "sparsity does not apply to it; name a structured or unstructured method")
        if "uniform" not in self.study.baseline_rules:
            raise ValueError(f"field 'study.baseline_methods': {methods} is given but study.baseline_rules "
                             f"{self.study.baseline_rules} has no 'uniform', the rule they are applied with")
        return self

    # ---- derived values: one place decides the defaults ----
    @property
    def baseline_sparsities(self) -> list[float]:
        if self.study.baselines is not None:
            return list(self.study.baselines)
        low, high = self.space.sparsity.low, self.space.sparsity.high
        return [value for value in DEFAULT_BASELINES if low <= value <= high]

    @property
    def unstructured_baseline_sparsities(self) -> list[float]:
        """The sparsities of the unstructured rules (global magnitude, OWL; uniform with an unstructured
        method): ``study.baselines`` when given, else :data:`DEFAULT_UNSTRUCTURED_BASELINES` in range."""
        if self.study.baselines is not None:
            return list(self.study.baselines)
        low, high = self.space.sparsity.low, self.space.sparsity.high
        return [value for value in DEFAULT_UNSTRUCTURED_BASELINES if low <= value <= high]

    @property
    def work_path(self) -> Path:
        return (self.base_dir / self.work_dir).resolve()

    @property
    def study_path(self) -> Path:
        """This study's own files (dense model, trial models): ``<work_dir>/studies/<study.name>``, so that
        several studies share one work dir (and its databases) without touching each other's files."""
        return self.work_path / "studies" / self.study.name

    @property
    def dense_path(self) -> Path:
        """Where the dense model pre-trained for this study is kept (``model.pretrain``)."""
        return self.study_path / "dense.pt"

    def trial_path(self, number: int) -> Path:
        """Trial ``number``'s model files: ``<work_dir>/studies/<study>/trials/NNNNN``."""
        return self.study_path / "trials" / f"{number:05d}"

    @property
    def storage_url(self) -> str:
        return self.study.storage or f"sqlite:///{self.work_path / 'optuna.db'}"

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.work_path / 'mlflow.db'}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.study.name

    @property
    def checkpoint_path(self) -> Path | None:
        ckpt = self.model.checkpoint
        return None if ckpt is None else (self.base_dir / ckpt).resolve()

    def snapshot(self) -> dict[str, Any]:
        """The config as plain JSON-able data (without ``base_dir``)."""
        return json.loads(self.model_dump_json(exclude={"base_dir"}))

    def digest(self) -> str:
        """A short hash of what determines results, to detect edits on resume."""
        text = json.dumps(self.snapshot(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_factory(value: str) -> str:
    module, sep, attr = value.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"expected 'module:callable', got {value!r}")
    return value


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: ``line L, column C: what`` (1-based, as editors count)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    context = getattr(exc, "context", None)
    what = f"{problem} ({context})" if context else problem
    if "'\\t'" in problem:
        what += "; indent with spaces, not tabs"
    if mark is None:
        return f"an unknown place: {what}"
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b=1'`` -> ``(['a', 'b'], 1)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected 'dotted.key=value'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML at {yaml_problem(exc)}") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``dotted.key=value`` in ``raw`` (a copy), creating sections as needed."""
    result = json.loads(json.dumps(raw, default=str))
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return result


def _describe(error: dict[str, Any]) -> str:
    field = ".".join(str(part) for part in error["loc"])
    message = error["msg"]
    if not field:  # a check across sections: its message names the fields itself
        return message.removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"field {field!r}: unknown key"
    if error["type"] == "missing":
        return f"field {field!r}: required but missing"
    given = error.get("input")
    return f"field {field!r}: {message}; got {given!r}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> SearchConfig:
    """Read, override and validate a config file; raise :class:`ConfigError` on any problem."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path}: is a directory; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML at {yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path}: cannot read: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(raw).__name__}")
    config = config_from_mapping(raw, path.resolve().parent, overrides, source=f"config {path}")
    for section in ("model", "data"):  # a file names its factories; Python code may pass objects instead
        if getattr(config, section).factory is None:
            raise ConfigError(f"config {path}: field '{section}.factory': required but missing (a 'module:callable' "
                              f"returning the {'model' if section == 'model' else '(train_loader, val_loader)'})")
    return config


def config_from_mapping(raw: Mapping[str, Any], base_dir: str | Path, overrides: list[str] | None = None, *,
                        source: str = "config") -> SearchConfig:
    """Override and validate a config given as a mapping (from a YAML file, or Python code); relative paths
    in it are relative to ``base_dir``. Every problem is one :class:`ConfigError` starting with ``source``."""
    if "base_dir" in raw:
        raise ConfigError(f"{source}: field 'base_dir': unknown key")
    raw = apply_overrides(dict(raw), overrides or [])
    raw["base_dir"] = str(Path(base_dir).resolve())
    try:
        config = SearchConfig.model_validate(raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None
    _check_work_dir(source, config)
    return config


ALWAYS_CHANGEABLE = ("study.n_trials", "study.storage", "study.db_url", "execution.", "tracking.uri",
                     "tracking.log_models",
                     "tracking.model_formats", "study.baselines", "study.baseline_rules", "study.baseline_methods",
                     "space.sensitivity_bounds",
                     "space.sensitivity_margin")
"""Config fields a resume may change freely: how long and where the search runs, not what it searches
(baselines and sensitivity caps are read only when the study is created)."""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping) and data:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): data}


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any],
                   allowed: Sequence[str] = ()) -> list[str]:
    """The dotted fields whose values differ between two config snapshots, except those a resume may change
    (:data:`ALWAYS_CHANGEABLE`) and those in ``allowed`` (a field, or a section ending in '.'/'*')."""
    old, new = _flatten(stored), _flatten(current)
    free = (*ALWAYS_CHANGEABLE, *(a.rstrip("*") for a in allowed))

    def is_free(name: str) -> bool:
        return any(name == f or (f.endswith(".") and name.startswith(f)) or name.startswith(f + ".") for f in free)

    defaults = _flatten(SearchConfig(study=StudyConfig(name="defaults")).snapshot())

    def added_as_default(name: str) -> bool:  # a field newer than the study, at the value it searched with
        return name not in old and name in defaults and new.get(name) == defaults[name]

    return sorted(name for name in old.keys() | new.keys()
                  if old.get(name) != new.get(name) and not is_free(name) and not added_as_default(name))


def _check_work_dir(source: str | Path, config: SearchConfig) -> None:
    """``work_dir`` must be a directory or creatable as one: no existing file on its path."""
    for where in (config.work_path, *config.work_path.parents):
        if where.exists():
            if not where.is_dir():
                what = "is an existing file" if where == config.work_path else f"is under {where}, an existing file"
                raise ConfigError(f"{source}: field 'work_dir': expected a directory (existing or to be "
                                  f"created), got {config.work_path}, which {what}")
            return
