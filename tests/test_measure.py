"""Tests for autoprune.measure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.measure import (
    LatencySample,
    count_macs,
    count_parameters,
    evaluate_accuracy,
    honest_latency_ms,
    reference_latency_ms,
    time_interleaved,
    time_model,
)


class FixedLogits(nn.Module):
    """Predicts class ``x[:, 0]`` (an integer stored as float): accuracy is known by construction."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Linear(1, 1)  # gives the model a parameter (device) and a training flag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, 0].long(), self.num_classes).float()


def test_evaluate_accuracy_known_answer_and_restores_training_flag() -> None:
    model = FixedLogits()
    model.train()
    preds = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    labels = torch.tensor([0, 1, 2, 1, 1, 0, 0, 2, 2, 0])  # 7 of 10 agree
    x = preds.float().unsqueeze(1)
    loader = [(x[:4], labels[:4]), (x[4:], labels[4:])]
    assert evaluate_accuracy(model, loader) == pytest.approx(0.7)
    assert model.training and model.dummy.training


def test_evaluate_accuracy_uses_eval_mode_and_no_grad() -> None:
    seen: list[tuple[bool, bool]] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((self.training, torch.is_grad_enabled()))
            return torch.zeros(x.shape[0], 2)

    assert evaluate_accuracy(Probe(), [(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))]) == 1.0
    assert seen == [(False, False)]


def test_evaluate_accuracy_empty_loader_raises() -> None:
    with pytest.raises(ValueError, match="no samples"):
        evaluate_accuracy(FixedLogits(), [])


def test_count_parameters_with_known_zeros() -> None:
    layer = nn.Linear(4, 3)  # 12 weights + 3 biases
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[0].zero_()  # 4 zeros
        layer.weight[1, 2] = 0.0  # 1 zero
        layer.bias.copy_(torch.tensor([0.0, 2.0, 3.0]))  # 1 zero
    assert count_parameters(layer) == (15, 9)


def test_count_parameters_counts_tied_weights_once() -> None:
    a = nn.Linear(3, 3, bias=False)
    b = nn.Linear(3, 3, bias=False)
    b.weight = a.weight
    assert count_parameters(nn.Sequential(a, b)) == (9, 9)


def test_count_macs_linear_and_conv() -> None:
    assert count_macs(nn.Linear(10, 5), torch.randn(1, 10)) == 50
    assert count_macs(nn.Linear(10, 5), torch.randn(4, 10)) == 200  # whole batch
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    # out 8 x 8 x 8 positions, each 3 * 3 * 3 multiply-adds
    assert count_macs(conv, torch.randn(1, 3, 8, 8)) == 8 * 8 * 8 * 3 * 3 * 3


def test_count_macs_ignores_masked_zeros_and_keeps_bn_stats() -> None:
    model = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5))
    model.train()
    with torch.no_grad():
        model[0].weight[:, :8] = 0.0
    before = model[1].running_mean.clone()
    assert count_macs(model, torch.randn(2, 10)) == 2 * 50
    assert torch.equal(model[1].running_mean, before)
    assert model.training


def _big_and_tiny() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    big = nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256)
    )
    tiny = nn.Linear(256, 2)
    return big, tiny, torch.randn(32, 256)


def test_time_model_positive_and_restores_threads_and_mode() -> None:
    _, tiny, x = _big_and_tiny()
    tiny.train()
    threads = torch.get_num_threads()
    sample = time_model(tiny, x, threads=1, min_run_time=0.02)
    assert isinstance(sample, LatencySample)
    assert sample.median_ms > 0
    assert sample.iqr_ms >= 0
    assert sample.runs >= 1
    assert torch.get_num_threads() == threads
    assert tiny.training


def test_time_interleaved_keys_and_order_of_magnitude() -> None:
    big, tiny, x = _big_and_tiny()
    threads = torch.get_num_threads()
    samples = time_interleaved({"big": big, "tiny": tiny}, x, rounds=2, min_run_time=0.01)
    assert set(samples) == {"big", "tiny"}
    assert all(s.median_ms > 0 and s.runs >= 2 for s in samples.values())
    # ~2.4M vs 512 MACs per sample: a gap of three orders of magnitude
    assert samples["big"].median_ms > 5 * samples["tiny"].median_ms
    assert torch.get_num_threads() == threads


def test_time_interleaved_rejects_bad_rounds() -> None:
    with pytest.raises(ValueError, match="rounds"):
        time_interleaved({"a": nn.Identity()}, torch.zeros(1), rounds=0)


def test_honest_latency_scales_reference_by_ratio() -> None:
    big, tiny, x = _big_and_tiny()
    estimated, raw, ratio = honest_latency_ms(tiny, big, x, dense_alone_ms=10.0, rounds=2, min_run_time=0.01)
    assert raw > 0
    assert 0 < ratio < 0.2
    assert estimated == pytest.approx(10.0 * ratio)


def test_reference_latency_is_lowest_median() -> None:
    _, tiny, x = _big_and_tiny()
    ref = reference_latency_ms(tiny, x, repeats=2, min_run_time=0.01)
    assert 0 < ref < 10.0
    with pytest.raises(ValueError, match="repeats"):
        reference_latency_ms(tiny, x, repeats=0)


def test_count_macs_sees_transformer_attention() -> None:
    """The fused MHA fast path would hide attention from the counter; with it off, matmuls are counted."""
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    x = torch.randn(1, 5, 16)
    macs = count_macs(layer, x)
    # q/k/v + out projections (4 * 5 * 16 * 16) and the two FFN linears (2 * 5 * 16 * 32) at least
    assert macs >= 4 * 5 * 16 * 16 + 2 * 5 * 16 * 32
    assert torch.backends.mha.get_fastpath_enabled()
