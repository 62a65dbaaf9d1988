"""The contract every registered pruning method fulfils, on every zoo architecture.

:data:`CANDIDATES` records how many units each registered method finds on each
zoo model; a method that gains or loses candidates fails here instead of being
skipped. Pairs recorded as 0 (not applicable: no BatchNorm, no attention, no
residual block) are left out of the contract cases and checked to stay at 0. A
newly registered method needs its row in the table (and, for a structured method
with a new kind of surgery, a masking rule in :func:`_mask_dense`).
"""

from __future__ import annotations

import copy
import io
import random

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from zoo import ZOO, ZooEntry

from autoprune.errors import AutopruneError, ConfigError
from autoprune.methods import PruneContext, get_method, known_methods
from autoprune.methods.attention import AttentionHeads, MLPNeurons, scan_attention, scan_mlps
from autoprune.methods.removal import RemovedBlock
from autoprune.methods.structured import StructuredMethod

torch.set_num_threads(1)

#: Candidates of each method on each zoo model (its head protected); 0: not applicable.
_ARCHS = ("resnet", "densenet", "mobilenet", "transformer", "mlp", "hf")
_TABLE: dict[str, tuple[int, ...]] = {
    #                       resnet densenet mobilenet transformer mlp  hf
    "l1_unstructured":     (8,     4,       7,        7,          2,   12),
    "l2_unstructured":     (8,     4,       7,        7,          2,   12),
    "taylor_unstructured": (8,     4,       7,        7,          2,   12),
    "random_unstructured": (8,     4,       7,        7,          2,   12),
    "l1_structured":       (5,     4,       4,        2,          2,   2),
    "l2_structured":       (5,     4,       4,        2,          2,   2),
    "taylor_structured":   (5,     4,       4,        2,          2,   2),
    "bn_scale_structured": (5,     4,       4,        0,          2,   0),
    "random_structured":   (5,     4,       4,        2,          2,   2),
    "attention_heads":     (0,     0,       0,        2,          0,   2),
    "mlp_neurons":         (0,     0,       0,        2,          0,   2),
    "remove_block":        (2,     0,       1,        2,          0,   2),
    "wanda":               (0,     0,       0,        5,          2,   12),
    "wanda_2:4":           (0,     0,       0,        5,          2,   12),
    "wanda_4:8":           (0,     0,       0,        5,          1,   12),
    "sparsegpt":           (0,     0,       0,        5,          2,   12),
    "sparsegpt_2:4":       (0,     0,       0,        5,          2,   12),
    "sparsegpt_4:8":       (0,     0,       0,        5,          1,   12),
}  # fmt: skip
CANDIDATES = {(method, arch): n for method, row in _TABLE.items() for arch, n in zip(_ARCHS, row, strict=True)}

CASES = [pair for pair, count in CANDIDATES.items() if count > 0]
NOT_APPLICABLE = [pair for pair, count in CANDIDATES.items() if count == 0]
#: N:M methods (``wanda_2:4``...) accept only their fixed sparsity: no random ratios (tests/test_methods_llm.py).
RANDOM_CASES = [pair for pair in CASES if getattr(get_method(pair[0]), "fixed_sparsity", None) is None]


def _context(entry: ZooEntry) -> PruneContext:
    return PruneContext(
        example_inputs=entry.example(2),
        calibration_batches=entry.batches(),
        protected=frozenset({entry.head}),
    )


def _params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


def _flops(model: nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of one forward. Counted with autograd on: under ``no_grad`` an eval-mode
    ``nn.TransformerEncoderLayer`` takes a fused kernel that FlopCounterMode does not see."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(inputs)
    return counter.get_total_flops()


def _expected(total: int, ratio: float) -> int:
    return min(round(ratio * total), total - 1)


def _prune(
    method, model: nn.Module, targets: dict[str, float], context: PruneContext
) -> dict[str, list[int]]:
    torch.manual_seed(0)
    removed = method.prune(model, targets, context)
    if method.family == "unstructured":
        assert removed == {}
    else:
        assert set(removed) == set(targets)
    return removed


def _check_reached(method, dense, model, targets, removed) -> None:
    """Reached sparsity equals the request up to rounding to whole units."""
    dense_modules = dict(dense.named_modules())
    for unit, ratio in targets.items():
        before = dense_modules[unit]
        if method.family == "unstructured":
            after = model.get_submodule(unit)
            assert int((before.weight == 0).sum()) == 0, unit
            assert int((after.weight == 0).sum()) == round(ratio * before.weight.numel()), unit
        elif method.family == "removal":
            assert isinstance(model.get_submodule(unit), RemovedBlock) == (ratio >= 0.5), unit
            assert removed[unit] == ([0] if ratio >= 0.5 else []), unit
        elif isinstance(method, StructuredMethod):
            channels = before.weight.shape[1 if getattr(before, "transposed", False) else 0]
            after = model.get_submodule(unit)
            reached = channels - after.weight.shape[1 if getattr(after, "transposed", False) else 0]
            assert reached == _expected(channels, ratio) == len(removed[unit]), unit
        elif isinstance(method, AttentionHeads):
            heads = scan_attention(dense)[0][unit].num_heads
            block = scan_attention(model)[0][unit]
            assert heads - block.num_heads == _expected(heads, ratio) == len(removed[unit]), unit
            assert block.q.out_features == block.num_heads * block.head_dim == block.o.in_features
        elif isinstance(method, MLPNeurons):
            hidden = scan_mlps(dense)[unit].up.out_features
            unit_after = scan_mlps(model)[unit]
            assert hidden - unit_after.up.out_features == _expected(hidden, ratio) == len(removed[unit]), unit
            assert unit_after.down.in_features == unit_after.up.out_features
        else:
            assert removed.get(unit), f"{method.name} removed nothing from {unit}"
        if method.indexed:  # the contract's own count agrees with the surgery
            size = method.unit_size(dense, unit)
            assert size - method.unit_size(model, unit) == len(removed[unit]), unit
            assert method.removal_count(size, ratio, PruneContext(example_inputs=torch.zeros(1))) == len(
                removed[unit]
            ), unit


def _mask_dense(method, dense: nn.Module, removed: dict[str, list[int]], example: torch.Tensor) -> nn.Module:
    """A copy of ``dense`` with exactly the removed channels / heads / neurons zeroed."""
    masked = copy.deepcopy(dense)
    if isinstance(method, StructuredMethod):
        dg = tp.DependencyGraph().build_dependency(masked, example, forward_fn=lambda m, x: m(x))
        with torch.no_grad():
            for unit, idxs in removed.items():
                if idxs:
                    root = masked.get_submodule(unit)
                    group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, idxs)
                    for dep, group_idxs in group:
                        _zero(dep, group_idxs, dg)
    elif isinstance(method, AttentionHeads):
        blocks = scan_attention(masked)[0]
        with torch.no_grad():
            for unit, heads in removed.items():
                d = blocks[unit].head_dim
                for h in heads:
                    blocks[unit].o.weight[:, h * d : (h + 1) * d] = 0
    elif isinstance(method, MLPNeurons):
        units = scan_mlps(masked)
        with torch.no_grad():
            for unit, neurons in removed.items():
                units[unit].down.weight[:, neurons] = 0
    else:
        pytest.fail(f"no masking rule for structured method {method.name}: add one to _mask_dense")
    return masked


def _zero(dep, idxs: list[int], dg: tp.DependencyGraph) -> None:
    module = dep.target.module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.weight[idxs] = 0
        module.bias[idxs] = 0
    elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        transposed = getattr(module, "transposed", False)
        out_dim = 1 if transposed else 0
        if dg.is_out_channel_pruning_fn(dep.handler):
            module.weight.index_fill_(out_dim, torch.tensor(idxs), 0.0)
            if module.bias is not None:
                module.bias[idxs] = 0
        else:
            assert getattr(module, "groups", 1) == 1, f"cannot mask grouped input channels of {module}"
            module.weight.index_fill_(1 - out_dim, torch.tensor(idxs), 0.0)
    else:
        assert (
            not any(True for _ in module.parameters(recurse=False)) if isinstance(module, nn.Module) else True
        ), f"cannot mask {type(module).__name__} channels: extend _zero"


def _train_step(model: nn.Module, entry: ZooEntry) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs, labels = entry.batches(count=1, batch=4, seed=7)[0]
    loss = nn.functional.cross_entropy(model(inputs), labels)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    optimizer.step()
    assert torch.isfinite(loss)


def _check_export(model: nn.Module, inputs: torch.Tensor) -> None:
    model.eval()
    program = torch.export.export(model, (inputs,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(inputs), model(inputs), atol=1e-5, rtol=1e-4)


def test_candidate_table_covers_every_method_and_zoo_model() -> None:
    assert set(CANDIDATES) == {(method, arch) for method in known_methods() for arch in ZOO}, (
        "record the candidate count of every (method, zoo model) pair in CANDIDATES"
    )


@pytest.mark.parametrize(("method_name", "arch"), NOT_APPLICABLE)
def test_not_applicable_pairs_have_no_candidates(method_name: str, arch: str) -> None:
    entry = ZOO[arch]
    assert get_method(method_name).candidates(entry.build(seed=0).eval(), _context(entry)) == []


@pytest.mark.parametrize(("method_name", "arch"), CASES)
def test_contract_at_half(method_name: str, arch: str) -> None:
    entry, method = ZOO[arch], get_method(method_name)
    dense = entry.build(seed=0).eval()
    context = _context(entry)
    units = method.candidates(dense, context)
    assert len(units) == CANDIDATES[method_name, arch], units
    assert len(set(units)) == len(units) and entry.head not in units
    assert method.candidates(dense, context) == units, "candidates must be stable"
    x = entry.example(3, seed=5)
    with torch.no_grad():
        dense_out = dense(x)
    dense_params, dense_nonzero = _params(dense)
    dense_flops = _flops(dense, x)

    model = copy.deepcopy(dense)
    targets = {unit: 0.5 for unit in units}
    removed = _prune(method, model, targets, context)

    _check_reached(method, dense, model, targets, removed)
    model.eval()
    params, nonzero = _params(model)
    flops = _flops(model, x)
    with torch.no_grad():
        pruned_out = model(x)
    assert pruned_out.shape == dense_out.shape
    if method.family == "unstructured":
        assert params == dense_params and flops == dense_flops
        assert nonzero < dense_nonzero
    else:
        assert params < dense_params and flops < dense_flops
    if method.family == "structured":
        for unit in units:  # every unit physically shrinks
            before = sum(p.numel() for p in dense.get_submodule(unit).parameters())
            assert sum(p.numel() for p in model.get_submodule(unit).parameters()) < before, unit
        masked = _mask_dense(method, dense, removed, context.example_inputs).eval()
        with torch.no_grad():
            torch.testing.assert_close(pruned_out, masked(x), atol=1e-4, rtol=1e-4)
    if method.family != "unstructured":  # replaying the report repeats the surgery exactly
        again = copy.deepcopy(dense)
        method.replay(again, removed, context)
        mine, theirs = model.state_dict(), again.state_dict()
        assert mine.keys() == theirs.keys()
        assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []

    _check_export(copy.deepcopy(model), x)
    _train_step(model, entry)


@pytest.mark.parametrize(("method_name", "arch"), RANDOM_CASES)
def test_contract_random_ratios(method_name: str, arch: str) -> None:
    """A seeded random subset of units at seeded random ratios reaches the counts."""
    entry, method = ZOO[arch], get_method(method_name)
    dense = entry.build(seed=1).eval()
    context = _context(entry)
    units = method.candidates(dense, context)
    assert len(units) == CANDIDATES[method_name, arch], units
    rng = random.Random(f"{method_name}/{arch}")
    chosen = rng.sample(units, k=max(1, len(units) // 2))
    if method.family == "removal":
        targets = {unit: float(rng.choice([0.0, 1.0])) for unit in chosen}
    else:
        targets = {unit: round(rng.uniform(0.05, 0.9), 3) for unit in chosen}
    model = copy.deepcopy(dense)
    removed = _prune(method, model, targets, context)
    _check_reached(method, dense, model, targets, removed)
    _train_step(model, entry)


def _first_case(method_name: str) -> tuple[ZooEntry, nn.Module, PruneContext, list[str]]:
    """The first zoo model (in table order) where the method has candidates."""
    arch = next(arch for (method, arch), count in CANDIDATES.items() if method == method_name and count)
    entry = ZOO[arch]
    model = entry.build(seed=0)
    context = _context(entry)
    units = get_method(method_name).candidates(model, context)
    assert len(units) == CANDIDATES[method_name, arch], units
    return entry, model, context, units


@pytest.mark.parametrize("method_name", known_methods())
def test_ratio_zero_leaves_model_unchanged(method_name: str) -> None:
    _, model, context, units = _first_case(method_name)
    before = copy.deepcopy(model)
    training = [m.training for m in model.modules()]
    get_method(method_name).prune(model, {unit: 0.0 for unit in units}, context)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    assert [m.training for m in model.modules()] == training
    after_state = model.state_dict()
    for key, value in before.state_dict().items():
        assert torch.equal(after_state[key], value), key


@pytest.mark.parametrize("method_name", [m for m in known_methods() if get_method(m).family != "removal"])
def test_ratio_over_cap_raises(method_name: str) -> None:
    _, model, context, units = _first_case(method_name)
    context.max_layer_sparsity = 0.6
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AutopruneError) as info:
        get_method(method_name).prune(model, {units[0]: 0.7}, context)
    message = str(info.value)
    assert units[0] in message and "0.7" in message and "0.6" in message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("method_name", known_methods())
def test_unknown_unit_is_an_error(method_name: str) -> None:
    _, model, context, _ = _first_case(method_name)
    with pytest.raises(AutopruneError, match="no_such_layer"):
        get_method(method_name).prune(model, {"no_such_layer": 0.5}, context)


def test_unknown_method_lists_known_names() -> None:
    with pytest.raises(ConfigError) as info:
        get_method("l3_magic")
    for name in known_methods():
        assert name in str(info.value)


def test_registry_families() -> None:
    expected = {
        "attention_heads": "structured",
        "bn_scale_structured": "structured",
        "l1_structured": "structured",
        "l1_unstructured": "unstructured",
        "l2_structured": "structured",
        "l2_unstructured": "unstructured",
        "mlp_neurons": "structured",
        "random_structured": "structured",
        "random_unstructured": "unstructured",
        "remove_block": "removal",
        "taylor_structured": "structured",
        "taylor_unstructured": "unstructured",
    }
    assert {name: get_method(name).family for name in expected} == expected
    assert all(
        get_method(name).family in {"removal", "structured", "unstructured"} for name in known_methods()
    )
