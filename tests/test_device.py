"""Trials on a device and in a precision (issue 9): everything here runs on the CPU; what needs CUDA is
skipped without it. ``benchmarks/gpu_check.py`` exercises the CUDA path on a GPU machine."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from autoprune.config import load_config
from autoprune.errors import ConfigError
from autoprune.execution import InProcessExecutor, TrialPayload
from autoprune.inputs import build_inputs, finetune_settings
from autoprune.measure import evaluate_accuracy
from autoprune.model_files import SKELETON_FILE, WEIGHTS_FILE, load_model
from autoprune.plan import LayerPlan, Plan, TrialFailure, TrialResult
from autoprune.tracking import DEVICE_TAG, LATENCY_DEVICE_TAG, _device_tags
from autoprune.training import TrainSettings, resolve_device, train
from autoprune.trial import TrialSettings, measure_dense, run_trial

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (torch.cuda.is_available() is False here)")
without_cuda = pytest.mark.skipif(CUDA, reason="checks the error raised where CUDA is missing")
STRUCTURED = Plan((LayerPlan("conv1", "l1_structured", 0.5),))


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---- which device ----
def test_device_resolution_on_a_machine_without_a_gpu_assigned() -> None:
    assert resolve_device("cpu", gpu_assigned=True).type == "cpu"
    assert resolve_device("auto", gpu_assigned=False).type == "cpu"  # no GPU given: CPU even where CUDA is
    assert resolve_device("auto", gpu_assigned=True).type == ("cuda" if CUDA else "cpu")
    with pytest.raises(ConfigError, match=r"field 'execution\.device': expected one of auto, cpu, cuda"):
        resolve_device("gpu", gpu_assigned=True)


@without_cuda
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"field 'execution.device': 'cuda' needs CUDA.*is_available\(\) is False"):
        resolve_device("cuda", gpu_assigned=True)


# ---- config ----
def test_config_defaults_keep_cpu_fp32(tiny_project: Path) -> None:
    config = load_config(tiny_project)
    assert (config.execution.device, config.finetune.precision, config.finetune.eval_precision,
            config.latency.device) == ("auto", "fp32", None, None)
    assert finetune_settings(config).precision == "fp32"


@pytest.mark.parametrize(("overrides", "message"), [
    (["execution.device=cuda"], "field 'execution.device': 'cuda' on the Ray backend needs "
                                "execution.gpus_per_trial > 0"),
    (["execution.gpus_per_trial=1.5"], "field 'execution.gpus_per_trial': .*fraction of one GPU.*got 1.5"),
    (["execution.gpus_per_trial=-0.5"], "field 'execution.gpus_per_trial': .*greater than or equal to 0"),
    (["execution.device=tpu"], "field 'execution.device': .*'auto', 'cpu' or 'cuda'"),
    (["finetune.precision=fp8"], "field 'finetune.precision': .*'fp32', 'bf16' or 'fp16'"),
    (["finetune.eval_precision=int8"], "field 'finetune.eval_precision'"),
    (["latency.device=auto"], "field 'latency.device': .*'cpu' or 'cuda'"),
])
def test_config_rejects(tiny_project: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_project, overrides)


@pytest.mark.parametrize("gpus", [0.25, 0.5, 1, 2])
def test_fractional_and_whole_gpus_are_accepted(tiny_project: Path, gpus: float) -> None:
    config = load_config(tiny_project, [f"execution.gpus_per_trial={gpus}", "execution.device=cuda"])
    assert config.execution.gpus_per_trial == gpus


def test_settings_carry_device_and_precision(tiny_project: Path) -> None:
    config = load_config(tiny_project, ["execution.backend=in_process", "execution.device=cpu",
                                        "finetune.precision=bf16", "latency.device=cpu"])
    inputs = build_inputs(config)
    s = inputs.settings
    assert (s.device, s.gpus, s.finetune.precision, s.eval_precision, s.latency_device) == (
        "cpu", 0.0, "bf16", "bf16", "cpu")  # evaluation follows the fine-tuning precision unless told
    config = load_config(tiny_project, ["finetune.precision=bf16", "finetune.eval_precision=fp32"])
    assert build_inputs(config).settings.eval_precision == "fp32"


# ---- precision on the CPU ----
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cpu(tiny, precision: str) -> None:
    """bf16 autocast (and fp16 with a GradScaler, which torch allows on CPUs) trains: weights change, the loss
    and the accuracy stay finite, and accuracy is that of fp32 training within a few points."""
    torch.manual_seed(0)
    train_loader, val_loader = tiny.make_loaders()
    model = tiny.make_model()
    before = _weights(model)
    reference = copy.deepcopy(model)
    try:
        loss = train(model, train_loader, TrainSettings(epochs=5, lr=0.01, precision=precision))
    except RuntimeError as exc:  # an older torch without fp16 autocast / GradScaler on CPUs
        pytest.skip(f"torch refuses {precision} training on the CPU: {exc}")
    train(reference, tiny.make_loaders()[0], TrainSettings(epochs=5, lr=0.01))  # the same batches, in fp32
    assert math.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights
    accuracy = evaluate_accuracy(model, val_loader, precision=precision)
    fp32_accuracy = evaluate_accuracy(reference, val_loader)
    assert math.isfinite(accuracy) and 0.5 < accuracy <= 1.0
    assert abs(accuracy - fp32_accuracy) <= 0.1


def test_bf16_evaluation_is_close_to_fp32(tiny) -> None:
    torch.manual_seed(0)
    train_loader, val_loader = tiny.make_loaders()
    model = tiny.make_model()
    train(model, train_loader, TrainSettings(epochs=2, lr=0.01))
    fp32 = evaluate_accuracy(model, val_loader)
    assert abs(evaluate_accuracy(model, val_loader, precision="bf16") - fp32) <= 0.05


def _setup(tiny, **settings: object) -> tuple[nn.Module, DataLoader, DataLoader, TrialSettings]:
    torch.manual_seed(0)
    dense = tiny.make_model()
    train_loader, val_loader = tiny.make_loaders()
    train(dense, train_loader, TrainSettings(epochs=2, lr=0.01))
    base = dict(finetune=TrainSettings(epochs=1, precision="bf16"), protected=frozenset({"fc"}), latency_rounds=1,
                latency_min_run_time=0.01, device="cpu", eval_precision="bf16")
    return dense, train_loader, val_loader, TrialSettings(**{**base, **settings})


def test_bf16_trial_on_cpu_prunes_trains_and_saves_a_cpu_model(tiny, tmp_path: Path) -> None:
    dense, train_loader, val_loader, settings = _setup(tiny)
    baseline = measure_dense(dense, val_loader, settings, min_run_time=0.02)
    assert (baseline.latency_device, baseline.latency_batch) == ("cpu", 1)
    output = run_trial(dense, train_loader, val_loader, STRUCTURED, settings, baseline)
    result = output.result
    assert result.params < baseline.params and math.isfinite(result.accuracy) and 0 < result.accuracy <= 1
    assert result.train_seconds > 0 and result.latency_ms > 0
    assert (result.extra["on_cuda"], result.extra["latency_on_cuda"]) == (0.0, 0.0)
    (tmp_path / WEIGHTS_FILE).write_bytes(output.weights)
    (tmp_path / SKELETON_FILE).write_bytes(output.skeleton)
    loaded = load_model(tmp_path)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.conv1.out_channels == dense.conv1.out_channels // 2
    assert evaluate_accuracy(loaded, val_loader, precision="bf16") == pytest.approx(result.accuracy)


@without_cuda
def test_latency_on_cuda_without_cuda_fails_the_trial_naming_the_field(tiny) -> None:
    dense, train_loader, val_loader, settings = _setup(tiny, latency_device="cuda")
    baseline = measure_dense(dense, val_loader, TrialSettings(finetune=settings.finetune,
                                                              protected=settings.protected), min_run_time=0.02)
    with pytest.raises(ConfigError, match=r"field 'latency\.device': 'cuda' needs CUDA"):
        run_trial(dense, train_loader, val_loader, STRUCTURED, settings, baseline)


# ---- failures in a search ----
class _OutOfMemoryOnce(nn.Module):
    """A tiny CNN whose first training forward pass runs out of (CUDA) memory, as a too-large batch would."""

    budget: ClassVar[list[int]] = [1]  # class-level: shared by the copies a trial makes

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.budget[0] > 0:
            self.budget[0] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.inner(x)


def test_out_of_memory_fails_one_trial_and_the_next_runs(tiny) -> None:
    torch.manual_seed(0)
    inner = tiny.make_model()
    train_loader, val_loader = tiny.make_loaders()
    dense = _OutOfMemoryOnce(inner).eval()
    settings = TrialSettings(finetune=TrainSettings(epochs=1), protected=frozenset({"inner.fc"}), latency_rounds=1,
                             latency_min_run_time=0.01, device="auto")
    baseline = measure_dense(dense, val_loader, settings, min_run_time=0.02)
    executor = InProcessExecutor(TrialPayload(dense, train_loader, val_loader, settings, baseline))
    plan = Plan((LayerPlan("inner.conv2", "l1_unstructured", 0.5),))
    executor.submit(0, plan)
    executor.submit(1, plan)
    ((first, failure),) = executor.wait()
    ((second, output),) = executor.wait()
    assert first == 0 and isinstance(failure, TrialFailure)
    assert failure.kind == "out_of_memory" and "CUDA out of memory" in failure.reason
    assert second == 1 and isinstance(output.result, TrialResult) and output.result.accuracy > 0
    assert executor.placements[1]["device"] == "cpu"  # auto without a GPU given


@without_cuda
def test_device_cuda_without_cuda_is_a_failed_trial(tiny) -> None:
    dense, train_loader, val_loader, settings = _setup(tiny)
    baseline = measure_dense(dense, val_loader, settings, min_run_time=0.02)
    from dataclasses import replace

    executor = InProcessExecutor(TrialPayload(dense, train_loader, val_loader, replace(settings, device="cuda"),
                                              baseline))
    executor.submit(0, STRUCTURED)
    ((_, failure),) = executor.wait()
    assert isinstance(failure, TrialFailure) and failure.kind == "user_code"
    assert "field 'execution.device': 'cuda' needs CUDA" in failure.reason
    assert executor.placements[0]["device"] == "cuda (unavailable)"


def test_child_run_device_tags() -> None:
    def result(**extra: float) -> TrialResult:
        return TrialResult(accuracy=0.9, accuracy_drop=0.0, params=1, nonzero_params=1, macs=1, size_bytes=1,
                           latency_ms=1.0, latency_raw_ms=1.0, latency_ratio=1.0, param_sparsity=0.0,
                           train_seconds=0.0, extra=extra)

    assert _device_tags(result(on_cuda=1.0, latency_on_cuda=0.0)) == {DEVICE_TAG: "cuda", LATENCY_DEVICE_TAG: "cpu"}
    assert _device_tags(result()) == {} and _device_tags(None) == {}


# ---- on CUDA (skipped here) ----
@needs_cuda
def test_bf16_trial_on_cuda_saves_a_cpu_model(tiny, tmp_path: Path) -> None:
    dense, train_loader, val_loader, settings = _setup(tiny, device="cuda")
    baseline = measure_dense(dense, val_loader, settings, min_run_time=0.02)
    assert baseline.latency_device == "cuda"
    output = run_trial(dense, train_loader, val_loader, STRUCTURED, settings, baseline)
    assert output.result.extra["on_cuda"] == 1.0 and output.result.extra["gpu_peak_memory_mb"] > 0
    assert next(dense.parameters()).device.type == "cpu"  # the caller's dense model stays put
    (tmp_path / WEIGHTS_FILE).write_bytes(output.weights)
    (tmp_path / SKELETON_FILE).write_bytes(output.skeleton)
    assert all(p.device.type == "cpu" for p in load_model(tmp_path).parameters())


@needs_cuda
def test_cpu_latency_for_a_model_trained_on_cuda(tiny) -> None:
    dense, train_loader, val_loader, settings = _setup(tiny, device="cuda", latency_device="cpu")
    baseline = measure_dense(dense, val_loader, settings, min_run_time=0.02)
    assert baseline.latency_device == "cpu"
    result = run_trial(dense, train_loader, val_loader, STRUCTURED, settings, baseline).result
    assert (result.extra["on_cuda"], result.extra["latency_on_cuda"]) == (1.0, 0.0)
