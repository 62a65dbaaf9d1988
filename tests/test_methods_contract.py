"""The contract every registered pruning method fulfils, on every zoo architecture
and on tiny Llama, Mistral and Qwen2 causal LMs.

:data:`CANDIDATES` records how many units each registered method finds on each
zoo model and decoder; a method that gains or loses candidates fails here instead
of being skipped. Pairs recorded as 0 (not applicable: no BatchNorm, no attention,
no residual block; on the decoders, :data:`DECODER_NOT_APPLICABLE` says why) are
left out of the contract cases and checked to stay at 0. A newly registered method
needs its row in the table (and, for a structured method with a new kind of
surgery, a masking rule in :func:`_mask_dense`).

On the decoders (random weights from their configs, nothing downloaded) each case
also checks that greedy ``generate()`` gives the same tokens with and without the
KV cache after pruning, and takes one SGD step on the causal-LM loss.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import random
from collections.abc import Callable

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from zoo import DECODER_FAMILIES, ZOO, ZooEntry, tiny_decoder

from autoprune.errors import AutopruneError, ConfigError, UnsupportedLayerError
from autoprune.methods import PruneContext, PruningMethod, get_method, known_methods
from autoprune.methods.attention import AttentionHeads, MLPNeurons, scan_attention, scan_mlps
from autoprune.methods.llm import semi_structured_layers
from autoprune.methods.removal import RemovedBlock
from autoprune.methods.structured import StructuredMethod
from autoprune.methods.unstructured import apply_masks, masks_of
from autoprune.training import causal_lm_loss

torch.set_num_threads(1)

#: Candidates of each method on each zoo model (its head protected) and each 2-layer decoder (``lm_head``
#: protected; 7 linear layers per decoder layer); 0: not applicable.
_ARCHS = ("resnet", "densenet", "mobilenet", "transformer", "mlp", "hf", *DECODER_FAMILIES)
_TABLE: dict[str, tuple[int, ...]] = {
    #                       resnet densenet mobilenet transformer mlp  hf  llama mistral qwen2
    "l1_unstructured":     (8,     4,       7,        7,          2,   12, 14,   14,     14),
    "l2_unstructured":     (8,     4,       7,        7,          2,   12, 14,   14,     14),
    "taylor_unstructured": (8,     4,       7,        7,          2,   12, 14,   14,     14),
    "random_unstructured": (8,     4,       7,        7,          2,   12, 14,   14,     14),
    "l1_structured":       (5,     4,       4,        2,          2,   2,  0,    0,      0),
    "l2_structured":       (5,     4,       4,        2,          2,   2,  0,    0,      0),
    "taylor_structured":   (5,     4,       4,        2,          2,   2,  0,    0,      0),
    "bn_scale_structured": (5,     4,       4,        0,          2,   0,  0,    0,      0),
    "random_structured":   (5,     4,       4,        2,          2,   2,  0,    0,      0),
    "attention_heads":     (0,     0,       0,        2,          0,   2,  2,    2,      2),
    "mlp_neurons":         (0,     0,       0,        2,          0,   2,  2,    2,      2),
    "remove_block":        (2,     0,       1,        2,          0,   2,  2,    2,      2),
    "wanda":               (0,     0,       0,        5,          2,   12, 14,   14,     14),
    "wanda_2:4":           (0,     0,       0,        5,          2,   12, 14,   14,     14),
    "wanda_4:8":           (0,     0,       0,        5,          1,   12, 14,   14,     14),
    "sparsegpt":           (0,     0,       0,        5,          2,   12, 14,   14,     14),
    "sparsegpt_2:4":       (0,     0,       0,        5,          2,   12, 14,   14,     14),
    "sparsegpt_4:8":       (0,     0,       0,        5,          1,   12, 14,   14,     14),
    "magnitude_2:4":       (0,     0,       0,        5,          2,   12, 14,   14,     14),
    "magnitude_4:8":       (0,     0,       0,        5,          1,   12, 14,   14,     14),
}  # fmt: skip
CANDIDATES = {(method, arch): n for method, row in _TABLE.items() for arch, n in zip(_ARCHS, row, strict=True)}

CASES = [pair for pair, count in CANDIDATES.items() if count > 0 and pair[1] in ZOO]
NOT_APPLICABLE = [pair for pair, count in CANDIDATES.items() if count == 0 and pair[1] in ZOO]
#: N:M methods (``wanda_2:4``...) accept only their fixed sparsity: no random ratios (tests/test_methods_llm.py).
RANDOM_CASES = [pair for pair in CASES if getattr(get_method(pair[0]), "fixed_sparsity", None) is None]

DECODER_CASES = [pair for pair, count in CANDIDATES.items() if count > 0 and pair[1] in DECODER_FAMILIES]
_UNTRACEABLE = (
    "Torch-Pruning's channel groups: a decoder's heads and SwiGLU neurons are attention_heads' and mlp_neurons' "
    "units, the rest is coupled to attention; and Torch-Pruning cannot trace a Hugging Face decoder LM, so the "
    "channel methods refuse one with UnsupportedLayerError naming the methods that apply"
)
#: Why each method recorded as 0 on the decoders does not apply to them.
DECODER_NOT_APPLICABLE: dict[str, str] = {
    "l1_structured": _UNTRACEABLE,
    "l2_structured": _UNTRACEABLE,
    "taylor_structured": _UNTRACEABLE,
    "bn_scale_structured": f"no BatchNorm; {_UNTRACEABLE}",
    "random_structured": _UNTRACEABLE,
}
DECODER_NOT_APPLICABLE_CASES = [
    pair for pair, count in CANDIDATES.items() if count == 0 and pair[1] in DECODER_FAMILIES
]
#: Ids of the decoders' prompts, calibration batches and training step (vocabulary 128).
LM_IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def _context(entry: ZooEntry) -> PruneContext:
    return PruneContext(
        example_inputs=entry.example(2),
        calibration_batches=entry.batches(),
        protected=frozenset({entry.head}),
    )


@functools.cache
def _decoder(family: str) -> nn.Module:
    """The dense 2-layer tiny decoder of ``family`` (see :func:`zoo.tiny_decoder`), built once per session
    with seed 0; tests prune deep copies and never change it."""
    return tiny_decoder(family, seed=0, layers=2)


def _decoder_context() -> PruneContext:
    """What a ``model.task: causal_lm`` trial passes: ``lm_head`` protected, two calibration batches of
    ``(ids, labels = ids)`` and the causal-LM loss (Taylor's gradients, Wanda's and SparseGPT's inputs)."""
    return PruneContext(
        example_inputs=LM_IDS[:1],
        calibration_batches=[(LM_IDS[:2], LM_IDS[:2]), (LM_IDS[2:], LM_IDS[2:])],
        loss_fn=causal_lm_loss,
        protected=frozenset({"lm_head"}),
    )


def _decoder_targets(method: PruningMethod, units: list[str]) -> dict[str, float]:
    """Every unit at 0.5, except that ``remove_block`` takes out only the first half of the decoder layers
    (at 0.5 each, every layer would go and no decoder, nor KV cache, would be left to check)."""
    if method.family == "removal":
        return {unit: 0.5 if index < len(units) // 2 else 0.0 for index, unit in enumerate(units)}
    return dict.fromkeys(units, 0.5)


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
            # a part is a key/value head with its ``group`` query heads (group 1 without grouped-query attention)
            assert block.q.out_features == block.num_heads * block.group * block.head_dim == block.o.in_features
            assert block.k.out_features == block.num_heads * block.head_dim == block.v.out_features
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
    if method.family == "unstructured":
        _check_pattern(method, model, [unit for unit, ratio in targets.items() if ratio > 0])


def _check_nm(weight: torch.Tensor, n: int, m: int) -> None:
    """Exactly ``n`` non-zero weights in every ``m`` consecutive weights of a row (from a dense start)."""
    nonzero = (weight.detach().reshape(weight.shape[0], -1, m) != 0).sum(dim=2)
    assert bool((nonzero == n).all()), nonzero


def _check_pattern(method: PruningMethod, model: nn.Module, pruned: list[str]) -> None:
    """An N:M method keeps its pattern in every pruned layer and records it on the model (JSON-able, what a
    trial logs); any other unstructured method records nothing."""
    pattern = getattr(method, "pattern", None)
    record = semi_structured_layers(model)
    if pattern is None:
        assert record == {}
        return
    assert record == dict.fromkeys(pruned, f"{pattern[0]}:{pattern[1]}")
    assert json.loads(json.dumps(record)) == record
    for unit in pruned:
        _check_nm(model.get_submodule(unit).weight, *pattern)


def _mask_dense(method, dense: nn.Module, removed: dict[str, list[int]], example: torch.Tensor) -> nn.Module:
    """A copy of ``dense`` with exactly the removed channels / heads / neurons zeroed; for a removed block,
    the output projections of its attention and MLP branches zeroed, which makes a pre-norm residual block
    (``x + f(norm(x))``, a decoder layer) the identity."""
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
                width = blocks[unit].group * blocks[unit].head_dim  # a key/value head's query heads
                for h in heads:
                    blocks[unit].o.weight[:, h * width : (h + 1) * width] = 0
    elif isinstance(method, MLPNeurons):
        units = scan_mlps(masked)
        with torch.no_grad():
            for unit, neurons in removed.items():
                units[unit].down.weight[:, neurons] = 0
    elif method.family == "removal":
        with torch.no_grad():
            for unit in (unit for unit, parts in removed.items() if parts):
                block = masked.get_submodule(unit)
                outputs = [b.o for b in scan_attention(block)[0].values()] + [u.down for u in scan_mlps(block).values()]
                assert outputs, f"no attention or MLP output projection in block {unit}"
                for linear in outputs:
                    linear.weight.zero_()
                    if linear.bias is not None:
                        linear.bias.zero_()
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


def _train_step(model: nn.Module, method: PruningMethod, loss_of: Callable[[nn.Module], torch.Tensor]) -> None:
    """One SGD step on ``loss_of(model)``: every trainable parameter gets a gradient and every weight matrix
    (conv kernel, embedding) moves; a bias may not (one before a BatchNorm, a key bias under the softmax have
    zero gradients). An unstructured method's zeros are held as the trial holds them: masks taken right after
    pruning (``masks_of``) and re-applied after the step (``apply_masks``); then exactly the pruned weights are
    zero (an N:M pattern stays)."""
    masks = masks_of(model) if method.family == "unstructured" else {}
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = loss_of(model)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    optimizer.step()
    apply_masks(model, masks)
    assert torch.isfinite(loss)
    params = dict(model.named_parameters())
    assert [name for name, value in before.items() if value.dim() > 1 and torch.equal(params[name], value)] == []
    for unit, mask in masks.items():
        assert torch.equal(model.get_submodule(unit).weight != 0, mask), unit
    if getattr(method, "pattern", None) is not None:
        for unit in masks:
            _check_nm(model.get_submodule(unit).weight, *method.pattern)


def _classifier_loss(entry: ZooEntry) -> Callable[[nn.Module], torch.Tensor]:
    """The cross-entropy of a model on one fixed labelled batch of ``entry``."""
    inputs, labels = entry.batches(count=1, batch=4, seed=7)[0]
    return lambda model: nn.functional.cross_entropy(model(inputs), labels)


def _lm_loss(model: nn.Module) -> torch.Tensor:
    """The causal-LM loss with labels = the input ids."""
    ids = LM_IDS[:2, :12]
    return model(input_ids=ids, labels=ids).loss


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
    archs = [*ZOO, *DECODER_FAMILIES]
    assert set(CANDIDATES) == {(method, arch) for method in known_methods() for arch in archs}, (
        "record the candidate count of every (method, zoo model or decoder) pair in CANDIDATES"
    )
    assert {method for method, _ in DECODER_NOT_APPLICABLE_CASES} == set(DECODER_NOT_APPLICABLE), (
        "say in DECODER_NOT_APPLICABLE why a method does not apply to the decoders"
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
        assert nonzero < dense_nonzero and set(masks_of(model)) == set(units)
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
    _train_step(model, method, _classifier_loss(entry))


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
    _train_step(model, method, _classifier_loss(entry))


@pytest.mark.parametrize(("method_name", "family"), DECODER_NOT_APPLICABLE_CASES)
def test_channel_methods_refuse_decoders_with_the_methods_that_apply(method_name: str, family: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=rf"{method_name} cannot prune \w+ .*attention_heads, "
                       "mlp_neurons and remove_block"):
        get_method(method_name).candidates(_decoder(family), _decoder_context())
    wrapped = nn.Sequential(_decoder(family))  # one held inside a user's module too (its trace would run for minutes)
    with pytest.raises(UnsupportedLayerError, match=r"at '0'"):
        get_method(method_name).candidates(wrapped, _decoder_context())


def _check_generate(model: nn.Module) -> None:
    """Greedy ``generate()`` of 3 new tokens gives the same tokens with the KV cache as without it."""
    model.eval()
    prompt = LM_IDS[:1, :5]
    cached = model.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=False)
    assert cached.shape == (1, 8) and torch.equal(cached, uncached)
    assert torch.equal(cached[:, :5], prompt)


@pytest.mark.parametrize(("method_name", "family"), DECODER_CASES)
def test_decoder_contract_at_half(method_name: str, family: str) -> None:
    """Every unit at 0.5 (half of the layers for ``remove_block``) in a tiny causal LM: the reached sparsity
    or shapes, the shrunk logits equal the masked dense ones, replay, ``generate()``, one SGD step."""
    method, dense, context = get_method(method_name), _decoder(family), _decoder_context()
    units = method.candidates(dense, context)
    assert len(units) == CANDIDATES[method_name, family], units
    assert len(set(units)) == len(units) and method.candidates(dense, context) == units
    assert not [unit for unit in units if unit.startswith(("lm_head", "model.embed_tokens"))]
    x = LM_IDS[:3, :10]
    with torch.no_grad():
        dense_logits = dense(x).logits
    dense_params, dense_nonzero = _params(dense)

    model = copy.deepcopy(dense)
    targets = _decoder_targets(method, units)
    removed = _prune(method, model, targets, context)

    _check_reached(method, dense, model, targets, removed)
    model.eval()
    params, nonzero = _params(model)
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == dense_logits.shape
    if method.family == "unstructured":
        assert params == dense_params and nonzero < dense_nonzero
        assert set(masks_of(model)) == set(units)
    else:  # heads, neurons or layers are gone: the shrunk model computes what the masked dense one does
        assert params < dense_params and _flops(model, x) < _flops(dense, x)
        masked = _mask_dense(method, dense, removed, context.example_inputs).eval()
        with torch.no_grad():
            torch.testing.assert_close(logits, masked(x).logits, atol=1e-4, rtol=1e-4)
        again = copy.deepcopy(dense)
        method.replay(again, removed, context)
        mine, theirs = model.state_dict(), again.state_dict()
        assert mine.keys() == theirs.keys()
        assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []

    _check_generate(model)
    _train_step(model, method, _lm_loss)


def _first_case(method_name: str) -> tuple[ZooEntry, nn.Module, PruneContext, list[str]]:
    """The first zoo model (in table order) where the method has candidates."""
    arch = next(arch for (method, arch), count in CANDIDATES.items()
                if method == method_name and count and arch in ZOO)
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
