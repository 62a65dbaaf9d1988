"""ONNX: pruned models (structured: shrunk; unstructured: masked zeros) export through
``torch.onnx.export(..., dynamo=True)`` with a dynamic batch and match in ONNX Runtime; a mismatch is a clear
error; ``autoprune export --format onnx`` on a finished search; MLflow models carrying ``model.onnx``
(``tracking.model_formats``); latency timed in ONNX Runtime (``latency.runtime``), dense baseline included."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_tiny_search
from mlflow import MlflowClient
from typer.testing import CliRunner

from autoprune import measure
from autoprune.cli import app
from autoprune.config import config_from_mapping
from autoprune.errors import AutopruneError, ConfigError
from autoprune.export import check_onnx, export_onnx
from autoprune.plan import LayerPlan, Plan
from autoprune.trial import make_context, measure_dense, prune_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

PLANS = {
    "structured": Plan((LayerPlan("conv1", "l1_structured", 0.5), LayerPlan("conv2", "l1_structured", 0.5))),
    "unstructured": Plan((LayerPlan("conv1", "l1_unstructured", 0.5), LayerPlan("conv2", "l1_unstructured", 0.7))),
}


def _pruned(tiny_setup, kind: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    setup = tiny_setup()
    example = next(iter(setup.val_loader))[0]
    context = make_context(setup.train_loader, setup.settings, example[:1])
    return prune_model(setup.dense, PLANS[kind], context).eval(), setup.dense.eval(), example


@pytest.mark.parametrize("kind", ["structured", "unstructured"])
def test_pruned_models_export_to_onnx_and_match_in_onnxruntime(tiny_setup, tmp_path: Path, kind: str,
                                                               one_thread) -> None:
    model, dense, example = _pruned(tiny_setup, kind)
    report = export_onnx(model, [example[:50], example[50:]], tmp_path / "m.onnx")
    assert report.format == "onnx" and report.dynamic_batch and report.path.stat().st_size == report.bytes
    assert report.max_abs_diff < 1e-4 and report.samples == 101  # both batches and a batch of one
    session = measure.OnnxRuntimeModel(str(report.path))
    for batch in (1, 7):  # the batch dimension is dynamic
        x = torch.rand(batch, 1, 8, 8)
        (got,) = session(x)
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)
    params, dense_params = (sum(p.numel() for p in m.parameters()) for m in (model, dense))
    if kind == "structured":  # shrunk layers: a smaller graph
        assert params < 0.6 * dense_params
    else:  # masked zeros: the same shapes, the zeros kept as zeros by ONNX Runtime
        assert params == dense_params and float((model.conv2.weight == 0).float().mean()) >= 0.69


def _relu_onnx() -> measure.OnnxRuntimeModel:
    """A hand-written ONNX graph (no export: fast): ``relu(x)`` for ``x`` of shape ``[N, 4]``."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return measure.OnnxRuntimeModel(model.SerializeToString())


def test_a_mismatch_is_a_clear_error() -> None:
    session, batches = _relu_onnx(), [torch.randn(5, 4), torch.randn(1, 4)]
    assert check_onnx(session, torch.nn.ReLU(), batches) <= 1e-7
    with pytest.raises(AutopruneError, match=r"^ONNX file m\.onnx run in ONNX Runtime differs from the dense model "
                                             r"by up to .* on 6 validation samples \(tolerance 1\.0e-04\); the file "
                                             r"was written but should not be trusted$"):
        check_onnx(session, torch.nn.Tanh(), batches, what="the dense model", path=Path("m.onnx"))
    with pytest.raises(AutopruneError, match=r"gives outputs of shapes \[\(5, 4\)\] on a batch of 5; the model "
                                             r"gives \[\(5, 2\)\]"):
        check_onnx(session, torch.nn.Linear(4, 2), batches)
    nan = torch.nn.Module()
    nan.forward = lambda x: x * float("nan")
    with pytest.raises(AutopruneError, match="differs"):  # NaN is never within tolerance
        check_onnx(session, nan, batches)


def test_onnxruntime_latency_in_a_trial_and_the_dense_baseline(tiny_setup) -> None:
    setup = tiny_setup()
    settings = replace(setup.settings, latency_runtime="onnxruntime")
    baseline = measure_dense(setup.dense, setup.val_loader, settings, min_run_time=0.02)
    assert baseline.latency_runtime == "onnxruntime" and baseline.latency_ms > 0
    assert setup.baseline.latency_runtime == "eager"
    setup.settings, setup.baseline = settings, baseline
    output = setup.run(PLANS["structured"])
    assert output.result.latency_ms > 0 and output.result.latency_ratio > 0
    assert "latency_unscaled" not in output.result.extra  # the reference was timed in the same runtime


def test_runtime_config_fields() -> None:
    def config(**sections: object):
        return config_from_mapping({"study": {"name": "s"}, **sections}, ".")

    default = config()
    assert default.latency.runtime == "eager" and default.tracking.model_formats == ["torch"]
    assert config(latency={"runtime": "onnxruntime"}).latency.runtime == "onnxruntime"
    assert config(latency={"runtime": "compiled", "device": "cuda"}).latency.runtime == "compiled"
    assert config(tracking={"model_formats": ["torch", "onnx"]}).tracking.model_formats == ["torch", "onnx"]
    with pytest.raises(ConfigError, match=r"field 'latency\.runtime': .*'eager', 'onnxruntime' or 'compiled'"):
        config(latency={"runtime": "tensorrt"})
    with pytest.raises(ConfigError, match=r"field 'latency\.runtime': .*timed on the CPU.*got 'onnxruntime'"):
        config(latency={"runtime": "onnxruntime", "device": "cuda"})
    for bad in (["onnx"], ["torch", "torch"], []):
        with pytest.raises(ConfigError, match=r"field 'tracking\.model_formats': .*includes torch"):
            config(tracking={"model_formats": bad})
    with pytest.raises(ConfigError, match=r"field 'tracking\.model_formats\.1'"):
        config(tracking={"model_formats": ["torch", "tflite"]})


# ---------------------------------------------------------------- a finished (tiny) search
@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory):
    """A finished 2-trial study (in-process) whose Pareto trials' MLflow models carry model.onnx."""
    yield run_tiny_search(tmp_path_factory.mktemp("onnx_search"), ["tracking.model_formats=[torch, onnx]"])
    sys.modules.pop("tinymod", None)


def test_cli_export_format_onnx(searched, tmp_path: Path) -> None:
    config_path, overrides, _, summary = searched
    number = summary.front[0]["trial"]
    sets = [arg for o in overrides for arg in ("--set", o)]
    out = tmp_path / "deploy" / "model.bin"
    result = CliRunner().invoke(app, ["export", str(config_path), "--trial", str(number), "--out", str(out),
                                      "--format", "onnx", *sets])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "ONNX Runtime's outputs match the trial's model" in text and "onnxruntime.InferenceSession" in text
    session = measure.OnnxRuntimeModel(str(out))
    assert session(torch.rand(3, 1, 8, 8))[0].shape == (3, 10)
    bad = CliRunner().invoke(app, ["export", str(config_path), "--trial", str(number), "--out", str(out),
                                   "--format", "tflite", *sets])
    assert bad.exit_code != 0 and "option '--format': expected one of torch, onnx, got 'tflite'" in bad.output


def test_pareto_mlflow_models_carry_the_onnx_file(searched) -> None:
    _, _, config, summary = searched
    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment_name)
    models = client.search_logged_models([experiment.experiment_id])
    assert models and len(models) == len(summary.front)
    for model in models:
        assert model.tags["autoprune.files"] == "model.onnx"
        local = Path(model.artifact_location.removeprefix("file://"))
        (got,) = measure.OnnxRuntimeModel(str(local / "model.onnx"))(torch.rand(2, 1, 8, 8))
        assert got.shape == (2, 10)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags["autoprune.dense_latency_runtime"] == "eager"
    assert "runtime eager" in parent.data.tags["mlflow.note.content"]
