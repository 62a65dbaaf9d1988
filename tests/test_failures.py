"""Failures as data: a failed trial keeps its reason, its kind and its full traceback (Optuna attributes and
an MLflow artifact); ``run --debug`` stops at the trial's own exception instead."""

from __future__ import annotations

import textwrap
import traceback
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from autoprune.cli import app
from autoprune.config import load_config
from autoprune.errors import UnsupportedLayerError
from autoprune.execution import RayExecutor, failure_kind, trial_failure
from autoprune.plan import MAX_TRACEBACK, TrialFailure
from autoprune.study import FAILURE_KIND_ATTR, REASON_ATTR, TRACEBACK_ATTR
from autoprune.tracking import FAILURE_KIND_TAG, TRACEBACK_FILE

# The training loader breaks at its 4th batch: the driver's checks take one batch and a trial's calibration
# two, so only a trial's fine-tuning reaches it (in user code: the data's own iterator).
BROKEN_MODULE = '''
from tinymod import make_loaders as _tiny_loaders, make_model


class BreaksLate:
    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for index, batch in enumerate(self.inner):
            if index == 3:
                explode_in_user_code(index)
            yield batch


def explode_in_user_code(index):
    raise ValueError(f"user data broke at batch {index}")


def make_loaders():
    train, val = _tiny_loaders(400, 50)
    return BreaksLate(train), val
'''

CONFIG = """
study: {name: broken, n_trials: 1, sampler: random, seed: 0, baselines: []}
work_dir: work
model: {factory: "tinymod:make_model", pretrained: true}
data: {factory: "brokenmod:make_loaders"}
space: {methods: [l1_unstructured], sparsity: {low: 0.1, high: 0.5}}
finetune: {epochs: 1}
latency: {rounds: 1, min_run_time: 0.01}
execution: {backend: in_process}
"""


@pytest.fixture
def broken(tiny_project: Path) -> Path:
    (tiny_project.parent / "brokenmod.py").write_text(BROKEN_MODULE)
    config = tiny_project.parent / "broken.yaml"
    config.write_text(textwrap.dedent(CONFIG))
    return config


def test_a_raising_trial_keeps_kind_and_traceback(broken: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(broken)])
    assert result.exit_code == 0, (result.output, result.exception)
    config = load_config(broken)
    (trial,) = optuna.load_study(study_name="broken", storage=config.storage_url).get_trials()
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[REASON_ATTR] == "ValueError: user data broke at batch 3"  # the format of old
    assert trial.user_attrs[FAILURE_KIND_ATTR] == "user_code"
    text = trial.user_attrs[TRACEBACK_ATTR]
    assert text.startswith("Traceback (most recent call last)") and "explode_in_user_code" in text
    assert "brokenmod.py" in text and text.rstrip().endswith("ValueError: user data broke at batch 3")

    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name("broken")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("autoprune.trial") == "0"]
    assert run.info.status == "FAILED" and run.data.tags[FAILURE_KIND_TAG] == "user_code"
    assert run.data.tags["fail_reason"] == "ValueError: user data broke at batch 3"
    assert TRACEBACK_FILE in {a.path for a in client.list_artifacts(run.info.run_id)}
    logged = Path(client.download_artifacts(run.info.run_id, TRACEBACK_FILE)).read_text()
    assert logged == text


def test_debug_reraises_the_trials_own_exception(broken: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(broken), "--debug", "--set", "execution.backend=ray"])
    assert isinstance(result.exception, ValueError), (result.output, result.exception)
    assert str(result.exception) == "user data broke at batch 3"
    frames = [frame.name for frame in traceback.extract_tb(result.exc_info[2])]
    assert "explode_in_user_code" in frames
    config = load_config(broken)
    (trial,) = optuna.load_study(study_name="broken", storage=config.storage_url).get_trials()
    assert trial.state == TrialState.RUNNING  # not recorded as failed: 'resume' runs it again


def test_debug_lets_an_autoprune_error_of_a_trial_through(broken: Path) -> None:
    """A trial's own AutopruneError keeps its traceback too (config errors stay one line)."""
    text = BROKEN_MODULE.replace('raise ValueError(f"user data broke at batch {index}")',
                                 'from autoprune.errors import UnsupportedLayerError\n'
                                 '    raise UnsupportedLayerError(f"cannot prune batch {index}")')
    (broken.parent / "unsupportedmod.py").write_text(text)  # another name: this process imported brokenmod
    result = CliRunner().invoke(app, ["run", str(broken), "--debug", "--set",
                                      "data.factory=unsupportedmod:make_loaders"])
    assert isinstance(result.exception, UnsupportedLayerError), (result.output, result.exception)
    assert "explode_in_user_code" in [frame.name for frame in traceback.extract_tb(result.exc_info[2])]


def test_failure_kinds() -> None:
    assert failure_kind(ValueError("x")) == "user_code"
    assert failure_kind(torch.OutOfMemoryError("CUDA out of memory")) == "out_of_memory"
    assert failure_kind(MemoryError()) == "out_of_memory"
    assert failure_kind(UnsupportedLayerError("l1_structured cannot prune 'fc'")) == "unsupported_layer"
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("the trial failed") from inner
    except RuntimeError as outer:
        assert failure_kind(outer) == "out_of_memory"
        failure = trial_failure(outer)
    assert failure.kind == "out_of_memory" and failure.reason == "RuntimeError: the trial failed"
    assert "OutOfMemoryError: CUDA out of memory" in failure.traceback
    with pytest.raises(ValueError, match="kind must be one of"):
        TrialFailure("bad luck", "x")


def test_traceback_is_bounded_and_keeps_its_end() -> None:
    def bottom() -> None:
        raise ValueError("a long report:\n" + "".join(f"line {i}\n" for i in range(5000)) + "the end")

    with pytest.raises(ValueError) as info:
        bottom()
    failure = trial_failure(info.value)
    assert len(failure.traceback) <= MAX_TRACEBACK < len("".join(traceback.format_exception(info.value)))
    assert failure.traceback.startswith("Traceback") and "in bottom" in failure.traceback
    assert failure.traceback.endswith("line 4999\nthe end") and "characters cut" in failure.traceback


def _ray_outcome(exc: BaseException) -> TrialFailure:
    """What RayExecutor.wait makes of ``exc`` raised by ray.get, without starting Ray."""
    import ray.exceptions

    def get(ref: object) -> object:
        raise exc

    executor = RayExecutor.__new__(RayExecutor)
    executor._ray = SimpleNamespace(exceptions=ray.exceptions, wait=lambda refs, num_returns: (refs, []), get=get)
    executor._pending, executor.placements, executor._max_retries = {"ref": 7}, {}, 1
    [(number, outcome)] = executor.wait()
    assert number == 7 and isinstance(outcome, TrialFailure)
    return outcome


def test_ray_failure_kinds() -> None:
    import ray.exceptions

    crashed = _ray_outcome(ray.exceptions.WorkerCrashedError())
    assert crashed.kind == "worker_lost" and crashed.reason.startswith("WorkerCrashedError: ")
    assert crashed.reason.endswith("(attempts: 2)")
    assert _ray_outcome(ray.exceptions.NodeDiedError("node 1 died")).kind == "worker_lost"
    assert _ray_outcome(ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on "
                                                         "memory.")).kind == "out_of_memory"
    remote = ("Traceback (most recent call last):\n  File \"brokenmod.py\", line 3, in explode_in_user_code\n"
              "ValueError: user data broke")
    raised = ray.exceptions.RayTaskError("_ray_trial", remote, ValueError("user data broke"), proctitle="ray::t",
                                         pid=1, ip="127.0.0.1")
    failure = _ray_outcome(raised.as_instanceof_cause())
    assert failure.kind == "user_code" and failure.reason == "ValueError: user data broke"
    assert "explode_in_user_code" in failure.traceback
    oom = ray.exceptions.RayTaskError("_ray_trial", "Traceback ...", torch.OutOfMemoryError("CUDA out of memory"),
                                      proctitle="ray::t", pid=1, ip="127.0.0.1")
    assert _ray_outcome(oom.as_instanceof_cause()).kind == "out_of_memory"


def test_ray_workers_of_a_search_quiet_import_noise() -> None:
    """The local Ray a search starts runs :mod:`autoprune.worker_setup` in each worker as it starts, so
    torchao's import warnings (transformers imports it while a trial's model is unpickled) are not forwarded."""
    import logging

    import ray

    executor = RayExecutor(object(), parallel=1)  # any payload: only the workers' start-up is looked at here
    try:
        levels = ray.get(ray.remote(lambda: [logging.getLogger(n).level for n in ("torchao", "torch.utils._pytree")])
                         .remote(), timeout=120)
    finally:
        executor.shutdown()
    assert levels == [logging.ERROR, logging.ERROR]
