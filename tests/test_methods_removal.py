"""Block removal: which modules are blocks, what replacing them does."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ZOO, ZooEntry

from autoprune.errors import AutopruneError, UnsupportedLayerError
from autoprune.methods import PruneContext, get_method
from autoprune.methods.removal import RemovedBlock, find_blocks

torch.set_num_threads(1)


def _context(entry: ZooEntry) -> PruneContext:
    return PruneContext(example_inputs=entry.example(2), protected=frozenset({entry.head}))


@pytest.mark.parametrize(
    ("arch", "blocks"),
    [
        ("resnet", ["layer1.0", "layer1.1"]),  # not layer2.0 (downsamples), not layer1 (holds blocks)
        ("densenet", []),  # concatenation changes the shape: no residual block
        ("mobilenet", ["features.0"]),  # the inverted residual with a skip; features.1 has none
        ("transformer", ["encoder.layers.0", "encoder.layers.1"]),
        ("mlp", []),
        ("hf", ["layers.0", "layers.1"]),
    ],
)
def test_candidates_are_the_innermost_residual_blocks(arch: str, blocks: list[str]) -> None:
    entry = ZOO[arch]
    assert get_method("remove_block").candidates(entry.build(), _context(entry)) == blocks


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_shape_preserving_layers_without_skip_are_not_blocks() -> None:
    plain = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    model = nn.Sequential(plain, Residual(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    x = torch.randn(1, 4, 5, 5)
    assert find_blocks(model, x, frozenset({"3"})) == ["1"]
    # a protected module inside a block keeps the block
    assert find_blocks(model, x, frozenset({"1.conv"})) == []


def test_removing_a_block_equals_skipping_it() -> None:
    entry = ZOO["resnet"]
    model = entry.build(seed=1).eval()
    x = entry.example(2)
    with torch.no_grad():
        expected = model.fc(torch.flatten(model.pool(model.layer2(model.layer1[1](model.stem(x)))), 1))
    get_method("remove_block").prune(model, {"layer1.0": 1.0, "layer1.1": 0.3}, _context(entry))
    assert isinstance(model.layer1[0], RemovedBlock) and not isinstance(model.layer1[1], RemovedBlock)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_first_transformer_layer_can_go() -> None:
    entry = ZOO["transformer"]
    model = entry.build(seed=2)
    get_method("remove_block").prune(model, {"encoder.layers.0": 1.0}, _context(entry))
    assert isinstance(model.encoder.layers[0], RemovedBlock)
    x = entry.example(3)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[:, -2:] = True
    model.eval()
    with torch.no_grad():  # TransformerEncoder reads layers[0].self_attn and may take a fused path
        out = model.encoder(model.embed(x), src_key_padding_mask=padding)
    assert out.shape == (3, 6, 16) and torch.isfinite(out).all()
    model.train()
    model(x).sum().backward()


def test_errors() -> None:
    entry = ZOO["resnet"]
    method = get_method("remove_block")
    with pytest.raises(UnsupportedLayerError, match=r"layer2\.0.*space\.exclude"):
        method.prune(entry.build(), {"layer2.0": 1.0}, _context(entry))
    with pytest.raises(AutopruneError, match="outside"):
        method.prune(entry.build(), {"layer1.0": 1.5}, _context(entry))


def test_units_inside_a_removed_block_are_skipped_by_later_families() -> None:
    entry = ZOO["resnet"]
    model = entry.build(seed=3)
    context = _context(entry)
    get_method("remove_block").prune(model, {"layer1.0": 1.0}, context)
    removed = get_method("l1_structured").prune(
        model, {"layer1.0.conv1": 0.5, "layer2.0.conv1": 0.5}, context
    )
    assert removed["layer1.0.conv1"] == [] and len(removed["layer2.0.conv1"]) == 8
    get_method("l1_unstructured").prune(model, {"layer1.0.conv2": 0.5, "layer1.1.conv2": 0.5}, context)
    assert int((model.layer1[1].conv2.weight == 0).sum()) == model.layer1[1].conv2.weight.numel() // 2

    hf = ZOO["hf"]
    model = hf.build()
    get_method("remove_block").prune(model, {"layers.0": 1.0}, _context(hf))
    heads = get_method("attention_heads").prune(
        model, {"layers.0.self_attn": 0.5, "layers.1.self_attn": 0.5}, _context(hf)
    )
    assert heads["layers.0.self_attn"] == [] and len(heads["layers.1.self_attn"]) == 2
    model(hf.example(2)).sum().backward()
