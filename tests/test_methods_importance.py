"""Pluggable importances: the registry, the scores on each kind of unit, methods built from an
importance, and the contract hooks (unit_size, removal_count, replay) of the indexed methods."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zoo import ZOO

from autoprune.errors import AutopruneError, ConfigError
from autoprune.methods import (
    Importance,
    PruneContext,
    Unit,
    count_to_remove,
    get_importance,
    get_method,
    known_importances,
    known_methods,
    registry,
)
from autoprune.methods.unstructured import UnstructuredMethod

torch.set_num_threads(1)


def test_registered_importances_and_the_methods_built_from_them() -> None:
    assert known_importances() == ["bn_scale", "l1", "l2", "random", "taylor"]
    with pytest.raises(ConfigError, match="known importances: bn_scale, l1, l2, random, taylor"):
        get_importance("l3")
    for name in known_methods():
        method = get_method(name)
        if name != "remove_block":  # every other method ranks by an importance object
            assert isinstance(method.importance, Importance), name
            expected = name.rsplit("_", 1)[0] if name not in ("attention_heads", "mlp_neurons") else "l2"
            assert method.importance.name == expected, name
    assert get_method("l1_structured") is not get_method("l1_structured")  # fresh instances


def test_a_factory_must_build_the_method_it_is_registered_as(monkeypatch) -> None:
    monkeypatch.setitem(registry._REGISTRY, "l9_unstructured", lambda: UnstructuredMethod("l1_unstructured", "l1"))
    with pytest.raises(ValueError, match="calls itself 'l1_unstructured'"):
        get_method("l9_unstructured")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_method("l1_unstructured", lambda: UnstructuredMethod("l1_unstructured", "l1"))


def test_scores_of_weights_and_blocks() -> None:
    torch.manual_seed(0)
    context = PruneContext(example_inputs=torch.zeros(1, 4))
    up, down = nn.Linear(4, 6), nn.Linear(6, 4)
    weights = Unit.weights("up", up)
    assert torch.equal(get_importance("l1").scores(weights, context), up.weight.abs())
    assert torch.equal(get_importance("l2").scores(weights, context), up.weight.pow(2))
    blocks = Unit.blocks("up", 3, rows=(up,), columns=(down,))  # 3 parts of 2 neurons each
    per_neuron = up.weight.pow(2).sum(1) + up.bias.pow(2) + down.weight.pow(2).sum(0)
    torch.testing.assert_close(get_importance("l2").scores(blocks, context), per_neuron.view(3, 2).sum(1).sqrt())
    per_neuron = up.weight.abs().sum(1) + up.bias.abs() + down.weight.abs().sum(0)
    torch.testing.assert_close(get_importance("l1").scores(blocks, context), per_neuron.view(3, 2).sum(1))
    torch.manual_seed(1)
    drawn = get_importance("random").scores(blocks, context)
    torch.manual_seed(1)
    assert drawn.shape == (3,) and torch.equal(drawn, torch.rand(3))
    with pytest.raises(AutopruneError, match="BatchNorm channels only"):
        get_importance("bn_scale").scores(blocks, context)
    with pytest.raises(AutopruneError, match="prepare"):
        get_importance("taylor").scores(weights, context)


def test_taylor_on_blocks_sums_each_batch_term() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(2)]
    context = PruneContext(example_inputs=batches[0][0], calibration_batches=batches)
    unit = Unit.blocks("0", 6, rows=(model[0],), columns=(model[2],))
    taylor = get_importance("taylor")
    taylor.prepare(model, [unit], context)
    scores = taylor.scores(unit, context)
    assert all(p.grad is None for p in model.parameters())  # cleared after scoring
    expected = torch.zeros(6)
    for inputs, labels in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        a, b = model[0], model[2]
        expected += ((a.weight * a.weight.grad).abs().sum(1) + (a.bias * a.bias.grad).abs()
                     + (b.weight * b.weight.grad).abs().sum(0)).detach()
    torch.testing.assert_close(scores, expected)


class _Last(Importance):
    """Keeps the first weights of a layer: scores fall with the flat index."""

    name = "last"

    def scores(self, unit: Unit, context: PruneContext) -> torch.Tensor:
        weight = unit.params[0][0]
        return -torch.arange(weight.numel(), dtype=torch.float32).view_as(weight)


def test_a_method_takes_any_importance_object() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    method = UnstructuredMethod("last_unstructured", _Last())
    assert method.prune(model, {"0": 0.25}, PruneContext(example_inputs=torch.zeros(1, 4))) == {}
    flat = model[0].weight.detach().flatten()
    assert bool((flat[-4:] == 0).all()) and bool((flat[:-4] != 0).all())


@pytest.mark.parametrize(("method_name", "arch", "unit"), [
    ("l1_structured", "mlp", "body.0"),
    ("attention_heads", "transformer", "encoder.layers.0.self_attn"),
    ("mlp_neurons", "hf", "layers.0.mlp.fc1"),
])
def test_indexed_hooks_size_count_and_replay(method_name: str, arch: str, unit: str) -> None:
    entry, method = ZOO[arch], get_method(method_name)
    model = entry.build(seed=0).eval()
    context = PruneContext(example_inputs=entry.example(2), protected=frozenset({entry.head}), round_to=4)
    assert method.indexed and unit in method.candidates(model, context)
    size = method.unit_size(model, unit)
    assert method.unit_size(model, "no.such.unit") is None
    # whole heads ignore round_to; channels and neurons keep a multiple of it
    rounding = None if method_name == "attention_heads" else 4
    assert method.removal_count(size, 0.3, context) == count_to_remove(size, 0.3, rounding)
    if rounding:
        assert (size - method.removal_count(size, 0.3, context)) % 4 == 0
    assert method.removal_count(size, 0.9999, context) <= size - 1  # at least one part stays
    with pytest.raises(AutopruneError, match="cannot remove parts"):
        method.replay(copy.deepcopy(model), {unit: list(range(size))}, context)  # none would be left
    with pytest.raises(AutopruneError, match="cannot remove parts"):
        method.replay(copy.deepcopy(model), {unit: [size]}, context)
    again = copy.deepcopy(model)
    method.replay(again, {unit: [0, size - 1]}, context)
    assert method.unit_size(again, unit) == size - 2
    again(entry.example(2)).sum().backward()
