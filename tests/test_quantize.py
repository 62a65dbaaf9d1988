"""Int8 dynamic quantization: smaller files that reload exactly, zeros kept cheap, measured in trials."""

from __future__ import annotations

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
    weights = model_files.load_weights(q_files.weights_path)
    assert weights["1.weight"].dtype == torch.qint8 and weights["1.weight"].q_zero_point() == 0
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
    ints = [m._weight_bias()[0].int_repr() for m in quantize.quantized_linears(quantized).values()]
    assert sum(int((i[:] == 0).sum()) for i in ints[:2]) >= zeros  # symmetric qint8: 0.0 -> integer 0
    files = model_files.save_model(quantized, tmp_path / "sparse")
    assert files.weights_bytes < 0.45 * dense_q  # 1 bit per zero + 1 byte per kept weight
    blob = torch.load(files.weights_path, weights_only=True)
    entry = blob["tensors"]["1.weight"]
    assert entry["quantized"] == "torch.qint8" and isinstance(entry["int_repr"], dict)  # sparse int8 entry
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


def test_known_torch_deprecation_warnings_are_silenced() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize.quantize_model(mlp())
    assert not [w for w in caught if "quantiz" in str(w.message)], [str(w.message)[:80] for w in caught]


def test_unsupported_quantized_modules_and_old_files(tmp_path: Path) -> None:
    with quantize.quiet():
        half = torch.ao.quantization.quantize_dynamic(mlp(), {nn.Linear}, dtype=torch.float16)
    with pytest.raises(TypeError, match="only qint8"):
        model_files.save_model(half, tmp_path / "half")
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
