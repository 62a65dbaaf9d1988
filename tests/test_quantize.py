"""Int8 quantization (torchao): smaller files that reload exactly, zeros kept cheap, measured in trials."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from zoo import ZOO

from autoprune import model_files, quantize
from autoprune.measure import evaluate_accuracy
from autoprune.plan import LayerPlan, Plan


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10)).eval()


def prune_linears(model: nn.Module, ratio: float) -> int:
    zeros = 0
    with torch.no_grad():
        for layer in (model[1], model[3]):
            flat = layer.weight.view(-1)
            count = round(ratio * flat.numel())
            flat[flat.abs().argsort()[:count]] = 0
            zeros += count
    return zeros


def test_int8_file_is_about_4x_smaller_and_reloads_exactly(tmp_path: Path) -> None:
    model = mlp()
    quantized = quantize.quantize_model(model)
    assert len(quantize.quantized_linears(quantized)) == 3
    assert isinstance(model[1], nn.Linear)  # the float model is untouched
    dense_files = model_files.save_model(model, tmp_path / "float")
    q_files = model_files.save_model(quantized, tmp_path / "int8")
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    assert dense_files.weights_bytes > linear_bytes  # float32 weights are all there
    ratio = dense_files.weights_bytes / q_files.weights_bytes
    assert 3.5 < ratio < 4.1, ratio  # int8 weights; float32 biases and the file's overhead remain
    from autoprune.weights_format import read_weights

    weights = read_weights(q_files.weights_path.read_bytes())
    assert quantize.is_quantized_weight(weights["1.weight"]) and weights["1.weight"].qdata.dtype == torch.int8
    assert not weights["1.weight"].zero_point.any()  # symmetric: the integer 0 is 0.0
    assert weights["1.bias"].dtype == torch.float32

    reloaded = model_files.load_model(tmp_path / "int8")
    assert len(quantize.quantized_linears(reloaded)) == 3
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(x), quantized(x))
        assert (quantized(x) - model(x)).abs().max() < 0.05  # int8 rounding only
    assert quantize.parameter_counts(quantized)[0] == quantize.parameter_counts(model)[0]


def test_pruned_zeros_stay_zero_and_cost_one_bit(tmp_path: Path) -> None:
    dense_q = model_files.save_model(quantize.quantize_model(mlp()), tmp_path / "dense").weights_bytes
    model = mlp()
    zeros = prune_linears(model, 0.8)
    quantized = quantize.quantize_model(model)
    ints = [m.weight.qdata for m in quantize.quantized_linears(quantized).values()]
    assert sum(int((i[:] == 0).sum()) for i in ints[:2]) >= zeros  # symmetric int8: 0.0 -> integer 0
    files = model_files.save_model(quantized, tmp_path / "sparse")
    assert files.weights_bytes < 0.45 * dense_q  # 1 bit per zero + 1 byte per kept weight
    from safetensors import safe_open

    with safe_open(files.weights_path, "pt") as f:
        entry = json.loads(f.metadata()["entries"])["1.weight"]
        assert f.get_tensor("1.weight:qdata:mask").dtype == torch.uint8
    assert entry["quantized"]["class"] == "torchao.Int8Tensor" and "sparse" in entry["parts"]["qdata"]
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model_files.load_model(tmp_path / "sparse")(x), quantized(x))
    total, nonzero = quantize.parameter_counts(quantized)
    assert total - nonzero >= zeros


def test_stock_transformer_quantizes_and_reloads(tmp_path: Path) -> None:
    """nn.TransformerEncoderLayer's fast path reads linear1.weight: it must be off on the int8 copy."""
    entry = ZOO["transformer"]
    model, x = entry.build().eval(), entry.example(3)
    quantized = quantize.quantize_model(model, x)
    assert len(quantize.quantized_linears(quantized)) == 6  # embed, 2 x (linear1, linear2), head
    model_files.save_model(quantized, tmp_path)
    with torch.no_grad():
        assert torch.equal(model_files.load_model(tmp_path)(x), quantized(x))
        assert (quantized(x) - model(x)).abs().max() < 0.1


def test_no_deprecation_warnings_and_no_torch_ao_quantization() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = quantize.quantize_model(mlp())
    assert not [w for w in caught if "quantiz" in str(w.message)], [str(w.message)[:80] for w in caught]
    assert all(type(m).__module__.startswith("torch.nn") for m in quantized.modules())  # still nn.Linear layers
    source = Path(quantize.__file__).read_text() + Path(model_files.__file__).read_text()
    assert "torch.ao.quantization" not in source.replace("``torch.ao.quantization``", "")


def test_legacy_int8_trial_still_loads(tmp_path: Path) -> None:
    """A trial quantized with torch.ao by an older autoprune (weights.pt + skeleton.pt) still loads; such
    layers cannot be saved in the open format."""
    torch_ao = importlib.import_module("torch.ao.quantization")  # what older autoprune did
    with quantize.quiet():
        old = torch_ao.quantize_dynamic(mlp(), {nn.Linear}, dtype=torch.qint8)
    model_files._save_model_legacy(old, tmp_path / "old")
    reloaded = model_files.load_model(tmp_path / "old")
    assert len(quantize.quantized_linears(reloaded)) == 3
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(x), old(x))
    with pytest.raises(TypeError, match=r"torch\.ao quantization"):
        model_files.save_model(old, tmp_path / "new")
    torch.save({"format": model_files.FORMAT, "version": 1, "tensors": {"w": torch.ones(2)}}, tmp_path / "v1.pt")
    assert torch.equal(model_files.load_weights(tmp_path / "v1.pt")["w"], torch.ones(2))
    with pytest.raises(Exception, match=r"no nn\.Linear"):
        quantize.quantize_model(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_trial_measures_the_quantized_model(tiny_setup, tmp_path: Path) -> None:
    setup = tiny_setup(epochs=1)
    baseline = setup.baseline
    layers = (LayerPlan("conv2", "l1_unstructured", 0.6),)
    plain = setup.run(Plan(layers)).result
    output = setup.run(Plan(layers, quantize=True))
    result = output.result
    assert result.extra["quantized"] == 1.0 and plain.extra["quantized"] == 0.0
    assert result.size_bytes < plain.size_bytes  # fc (2560 weights) stored as int8
    assert result.latency_ms > 0 and result.latency_raw_ms > 0
    assert result.macs == plain.macs  # counted before quantization: same shapes
    assert result.params == baseline.params  # quantized weights are counted
    (tmp_path / model_files.WEIGHTS_FILE).write_bytes(output.weights)
    (tmp_path / model_files.SKELETON_FILE).write_bytes(output.skeleton)
    reloaded = model_files.load_model(tmp_path)
    assert quantize.is_quantized_linear(reloaded.fc)
    assert evaluate_accuracy(reloaded, setup.val_loader) == result.accuracy  # accuracy of the quantized model
    assert 0 <= result.extra["accuracy_before_quantization"] <= 1
