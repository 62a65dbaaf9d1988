"""The in-tree ResNet-50 and MobileNetV2 (search_spaces/vision_models.py): torchvision's sizes, a working
forward, and the units autoprune's search space finds in them (issue 9, item 5)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from autoprune.methods import PruneContext
from autoprune.space import SearchSpace

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
if str(SPACES) not in sys.path:
    sys.path.insert(0, str(SPACES))

import vision_models  # noqa: E402


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("factory", "expected"), [(vision_models.resnet50, 25_557_032),
                                                   (vision_models.mobilenet_v2, 3_504_872)])
def test_parameter_counts_equal_torchvisions_and_forward_gives_logits(factory, expected, one_thread) -> None:
    model = factory()
    assert n_params(model) == expected
    small = factory(num_classes=10).eval()
    with torch.no_grad():
        assert small(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_mobilenet_width_multiplier_follows_torchvision_rounding() -> None:
    half = vision_models.mobilenet_v2(width_mult=0.5)
    assert half.features[0][0].out_channels == 16 and half.last_channel == 1280  # the last width is kept
    assert sorted({block.out_channels for block in half.features[1:18]}) == [8, 16, 32, 48, 80, 160]


def test_search_space_of_mobilenet_v2_finds_channel_groups_and_layers(one_thread) -> None:
    model = vision_models.mobilenet_v2(num_classes=10).eval()
    context = PruneContext(example_inputs=torch.randn(1, 3, 64, 64), protected=frozenset({"classifier.1"}))
    space = SearchSpace.from_model(model, context, ["l1_structured", "l1_unstructured"])
    structured = {u.name for u in space.units if "l1_structured" in u.methods}
    unstructured = {u.name for u in space.units if "l1_unstructured" in u.methods}
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert unstructured == set(convs)  # every conv, depthwise included; the head is protected
    assert "classifier.1" not in structured | unstructured
    # One group per expansion (its 1x1 conv roots the group with the depthwise conv that follows), the stem
    # (with block 1's depthwise conv), block 1's projection, the last 1x1 conv, and one group per stage output
    # (the residual stream of its blocks), rooted at the stage's first projection.
    expansions = {f"features.{i}.conv.0.0" for i in range(2, 18)}
    stages = {f"features.{i}.conv.2" for i in (2, 4, 7, 11, 14, 17)}
    assert structured == expansions | stages | {"features.0.0", "features.1.conv.1", "features.18.0"}
    assert not any(name.endswith(".conv.1.0") for name in structured)  # depthwise convs follow their group
    assert len(structured) == 25


def test_factories_work_from_a_config_in_search_spaces(one_thread) -> None:
    from autoprune.config import config_from_mapping
    from autoprune.inputs import build_inputs

    config = config_from_mapping({
        "study": {"name": "vision"},
        "model": {"factory": "vision_models:mobilenet_v2", "kwargs": {"num_classes": 10}, "pretrained": True},
        "data": {"factory": "vision_models:synthetic_loaders",
                 "kwargs": {"size": 32, "num_classes": 10, "train": 4, "val": 2}},
        "space": {"methods": ["l1_structured"]},
    }, SPACES)
    inputs = build_inputs(config)
    assert inputs.settings.protected == frozenset({"classifier.1"})  # the head found by default
    assert len(inputs.space.units) == 25
