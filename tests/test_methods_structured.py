"""Structured (Torch-Pruning) methods: unit naming, exclusions, scoring, rounding, training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zoo import ZOO, ZooEntry, fine_tune

from autoprune.errors import AutopruneError, UnsupportedLayerError
from autoprune.methods import PruneContext, get_method

torch.set_num_threads(1)


def _context(entry: ZooEntry, **kwargs) -> PruneContext:
    defaults = {
        "example_inputs": entry.example(2),
        "calibration_batches": entry.batches(),
        "protected": frozenset({entry.head}),
    }
    return PruneContext(**{**defaults, **kwargs})


def test_group_members_point_to_their_root() -> None:
    entry = ZOO["resnet"]
    model = entry.build()
    method = get_method("l1_structured")
    # the residual stream is one group, named by its first layer
    assert method.candidates(model, _context(entry))[0] == "stem.0"
    with pytest.raises(UnsupportedLayerError) as info:
        method.prune(model, {"layer1.0.conv2": 0.5}, _context(entry))
    assert "'stem.0'" in str(info.value) and "space.exclude" in str(info.value)


def test_attention_coupled_groups_are_refused() -> None:
    entry = ZOO["transformer"]
    model = entry.build()
    method = get_method("l2_structured")
    assert method.candidates(model, _context(entry)) == [
        "encoder.layers.0.linear1",
        "encoder.layers.1.linear1",
    ]
    with pytest.raises(UnsupportedLayerError) as info:
        method.prune(model, {"embed": 0.25}, _context(entry))
    message = str(info.value)
    assert "'embed'" in message and "attention" in message and "space.exclude" in message


def test_protected_head_is_refused() -> None:
    entry = ZOO["resnet"]
    with pytest.raises(UnsupportedLayerError, match="protected"):
        get_method("l1_structured").prune(entry.build(), {"fc": 0.5}, _context(entry))


def test_bn_scale_needs_batchnorm_and_removes_the_smallest_gammas() -> None:
    assert get_method("bn_scale_structured").candidates(ZOO["hf"].build(), _context(ZOO["hf"])) == []
    entry = ZOO["mlp"]
    model = entry.build(seed=2)
    with torch.no_grad():
        model.body[1].weight.uniform_(0.5, 1.0)
        model.body[1].weight[[3, 17, 30]] = 0.01
    removed = get_method("bn_scale_structured").prune(model, {"body.0": 3 / 32}, _context(entry))
    assert removed == {"body.0": [3, 17, 30]}
    assert (
        model.body[0].out_features == 29
        and model.body[1].num_features == 29
        and model.body[3].in_features == 29
    )


def test_l1_removes_the_weakest_channels() -> None:
    entry = ZOO["resnet"]
    model = entry.build(seed=3)
    block = model.layer2[0]
    with torch.no_grad():
        block.conv1.weight[[2, 9]] *= 1e-3
        block.bn1.weight[[2, 9]] *= 1e-3
        block.conv2.weight[:, [2, 9]] *= 1e-3
    removed = get_method("l1_structured").prune(model, {"layer2.0.conv1": 2 / 16}, _context(entry))
    assert removed == {"layer2.0.conv1": [2, 9]}


def test_random_structured_is_reproducible_under_manual_seed() -> None:
    entry = ZOO["mobilenet"]
    picks = []
    for seed in (5, 5, 6):
        model = entry.build()
        torch.manual_seed(seed)
        picks.append(
            get_method("random_structured").prune(model, {"features.0.conv.0": 0.5}, _context(entry))
        )
    assert picks[0] == picks[1] != picks[2]


def test_round_to_rounds_the_kept_channels() -> None:
    entry = ZOO["resnet"]
    model = entry.build()
    context = _context(entry, round_to=4)
    # 30% of 16 = 4.8 -> 5 removed -> 11 kept -> nearest multiple of 4 is 12
    get_method("l1_structured").prune(model, {"layer2.0.conv1": 0.3}, context)
    assert model.layer2[0].conv1.out_channels == 12
    # 40% of 8 = 3.2 -> 3 removed -> 5 kept -> 4 (ties and below go down)
    get_method("l1_structured").prune(model, {"layer1.0.conv1": 0.4}, context)
    assert model.layer1[0].conv1.out_channels == 4


def test_at_least_one_channel_is_kept() -> None:
    entry = ZOO["mlp"]
    model = entry.build()
    get_method("l1_structured").prune(model, {"body.3": 0.98}, _context(entry))  # round(23.52) = 24 of 24
    assert model.body[3].out_features == 1
    model(entry.example(4)).sum().backward()


def test_taylor_structured_needs_calibration() -> None:
    entry = ZOO["mlp"]
    with pytest.raises(AutopruneError, match="calibration"):
        get_method("taylor_structured").prune(
            entry.build(), {"body.0": 0.5}, _context(entry, calibration_batches=())
        )


def test_training_flags_and_gradients_are_restored() -> None:
    entry = ZOO["resnet"]
    model = entry.build().train()
    get_method("taylor_structured").prune(model, {"layer1.0.conv1": 0.5}, _context(entry))
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_masked_equivalence_check_is_sensitive() -> None:
    """Zeroing channels other than the removed ones does not reproduce the pruned model,
    so the contract suite's equivalence check has teeth."""
    entry = ZOO["mlp"]
    dense = entry.build(seed=4).eval()
    model = copy.deepcopy(dense)
    removed = get_method("l1_structured").prune(model, {"body.0": 0.25}, _context(entry))["body.0"]
    x = entry.example(4, seed=9)
    outputs = {}
    for label, idxs in (
        ("right", removed),
        ("wrong", [i for i in range(32) if i not in removed][: len(removed)]),
    ):
        masked = copy.deepcopy(dense)
        with torch.no_grad():
            masked.body[1].weight[idxs] = 0
            masked.body[1].bias[idxs] = 0
        outputs[label] = masked(x)
    model.eval()
    torch.testing.assert_close(model(x), outputs["right"], atol=1e-5, rtol=1e-5)
    assert (model(x) - outputs["wrong"]).abs().max() > 1e-3


def test_transformer_ffn_channelsfine_tune() -> None:
    """Generic channel pruning of the feed-forward of a stock TransformerEncoder trains afterwards."""
    entry = ZOO["transformer"]
    model = entry.build(seed=1)
    get_method("l1_structured").prune(
        model, {"encoder.layers.0.linear1": 0.5, "encoder.layers.1.linear1": 0.75}, _context(entry)
    )
    assert model.encoder.layers[1].linear1.out_features == 8
    losses = fine_tune(model, entry)
    assert losses[-1] < losses[0]




class ChannelScale(nn.Module):
    """Multiplies by a per-channel buffer that Torch-Pruning does not know to shrink."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, channels).view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_a_layer_the_surgery_breaks_is_reported() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), ChannelScale(8), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
    )
    context = PruneContext(example_inputs=torch.randn(2, 3, 8, 8), protected=frozenset({"4"}))
    with pytest.raises(UnsupportedLayerError) as info:
        get_method("l1_structured").prune(model, {"0": 0.5}, context)
    assert "after pruning 0 (" in str(info.value) and "space.exclude" in str(info.value)
