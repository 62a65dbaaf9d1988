"""The one-shot LLM methods (Wanda, SparseGPT; unstructured and N:M; magnitude N:M) and the OWL allocation, on
the zoo MLP and on tiny random-initialized Hugging Face Llama, Mistral and Qwen2 causal LMs (nothing downloaded).

What every method owes on every model (candidates, the exact count per layer, the N:M pattern and its record,
``generate()`` and a fine-tuning step with the zeros held) is checked by tests/test_methods_contract.py; here
what is particular to these methods: fixed sparsity, calibration data, reconstruction error, OWL."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from zoo import DECODER_FAMILIES, ZOO, Logits, tiny_decoder

from autoprune.errors import AutopruneError, UnsupportedLayerError
from autoprune.methods import PruneContext, get_method
from autoprune.methods.llm import FixedSparsityError, capture_inputs, linear_layers, nm_lowest, semi_structured_layers
from autoprune.owl import decoder_blocks, layer_targets, owl_allocation

torch.set_num_threads(1)

UNSTRUCTURED = ("wanda", "sparsegpt")
#: N:M methods scored from calibration inputs, and the data-free magnitude N:M (its baseline).
CALIBRATED_NM = ("wanda_2:4", "wanda_4:8", "sparsegpt_2:4", "sparsegpt_4:8")
MAGNITUDE_NM = ("magnitude_2:4", "magnitude_4:8")
NM = CALIBRATED_NM + MAGNITUDE_NM
CALIBRATED = UNSTRUCTURED + CALIBRATED_NM


def _ids(batch: int = 4, seq: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _setup(kind: str, seed: int = 0) -> tuple[nn.Module, PruneContext]:
    if kind in ZOO:
        entry = ZOO[kind]
        return entry.build(seed).eval(), PruneContext(
            example_inputs=entry.example(2), calibration_batches=entry.batches(), protected=frozenset({entry.head}))
    ids = _ids()
    context = PruneContext(example_inputs=ids[:1], calibration_batches=[(ids[:2], ids[:2]), (ids[2:], ids[2:])],
                           protected=frozenset({"lm_head"}))
    return tiny_decoder(kind, seed), context


@pytest.mark.parametrize("kind", ("mlp", "llama"))
@pytest.mark.parametrize("name", UNSTRUCTURED + NM)
def test_candidates_are_the_linear_layers_the_pattern_fits(name: str, kind: str) -> None:
    """Every unprotected ``nn.Linear`` (never ``lm_head``), with N:M only those whose inputs are a multiple of M;
    the counts per model are in tests/test_methods_contract.py."""
    dense, context = _setup(kind)
    pattern = get_method(name).pattern
    linears = [n for n, mod in dense.named_modules() if isinstance(mod, nn.Linear) and n not in context.protected]
    expected = [n for n in linears if not pattern or dense.get_submodule(n).in_features % pattern[1] == 0]
    assert get_method(name).candidates(dense, context) == expected and expected and "lm_head" not in expected


def test_a_wrapped_language_models_lm_head_is_no_candidate() -> None:
    """Inside the user's ``ids -> logits`` module (as a search takes a Hugging Face LM) the output embeddings are
    found one level down and stay dense, even when nothing protects them."""
    wrapped = Logits(tiny_decoder("llama", layers=1))
    context = PruneContext(example_inputs=torch.zeros(1, 4, dtype=torch.long))
    for name in ("wanda", "magnitude_2:4"):
        candidates = get_method(name).candidates(wrapped, context)
        assert "lm.lm_head" not in candidates and len(candidates) == 7, candidates  # q, k, v, o, gate, up, down


@pytest.mark.parametrize("name", MAGNITUDE_NM)
def test_magnitude_nm_zeros_the_smallest_of_each_group_without_data(name: str) -> None:
    """``magnitude_N:M`` keeps the N largest ``|W|`` of every M consecutive weights of a row, from the weights
    alone: no calibration batches, not one forward pass."""
    dense, context = _setup("llama")
    context.calibration_batches = ()
    method = get_method(name)
    assert not method.importance.needs_calibration
    n, m = method.pattern
    model = copy.deepcopy(dense)
    calls: list[str] = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append("forward"))
    units = method.candidates(model, context)
    method.prune(model, dict.fromkeys(units, 0.5), context)
    handle.remove()
    assert calls == []
    for unit in units:
        weight = dense.get_submodule(unit).weight.detach()
        assert torch.equal(model.get_submodule(unit).weight, weight * ~nm_lowest(weight.abs(), n, m)), unit
    assert semi_structured_layers(model) == dict.fromkeys(units, f"{n}:{m}")


@pytest.mark.parametrize("kind", ("mlp", "llama"))
@pytest.mark.parametrize("name", UNSTRUCTURED)
def test_random_ratios_are_reached_per_layer(name: str, kind: str) -> None:
    dense, context = _setup(kind, seed=1)
    method = get_method(name)
    rng = random.Random(f"{name}/{kind}")
    targets = {unit: round(rng.uniform(0.05, 0.9), 3) for unit in method.candidates(dense, context)}
    model = copy.deepcopy(dense)
    method.prune(model, targets, context)
    for unit, ratio in targets.items():
        weight = model.get_submodule(unit).weight
        assert int((weight == 0).sum()) == round(ratio * weight.numel()), unit
    assert semi_structured_layers(model) == {}


@pytest.mark.parametrize("name", NM)
def test_nm_methods_refuse_another_sparsity(name: str) -> None:
    model, context = _setup("llama")
    method = get_method(name)
    assert method.fixed_sparsity == 0.5
    unit = method.candidates(model, context)[0]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FixedSparsityError) as info:
        method.prune(model, {unit: 0.3}, context)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AutopruneError)
    message = str(info.value)
    assert name in message and unit in message and "0.5" in message and "0.3" in message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    method.prune(model, {unit: 0.0}, context)  # 0 means "leave it dense"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_unfit_layers_are_refused_with_the_reason() -> None:
    model, context = _setup("mlp")  # body.0 has 20 inputs: no 4:8 groups
    with pytest.raises(UnsupportedLayerError, match="20 input features are not a multiple of 8"):
        get_method("wanda_4:8").prune(model, {"body.0": 0.5}, context)
    model, context = _setup("transformer")
    with pytest.raises(UnsupportedLayerError, match="out_proj"):
        get_method("wanda").prune(model, {"encoder.layers.0.self_attn.out_proj": 0.5}, context)
    model, context = _setup("llama")
    context.protected = frozenset()
    assert "lm_head" not in get_method("sparsegpt").candidates(model, context)  # output embeddings never
    with pytest.raises(UnsupportedLayerError, match="output embedding"):
        get_method("sparsegpt").prune(model, {"lm_head": 0.5}, context)


@pytest.mark.parametrize("name", CALIBRATED)
def test_calibration_data_is_required(name: str) -> None:
    model, context = _setup("llama")
    context.calibration_batches = ()
    with pytest.raises(AutopruneError, match="calibration"):
        get_method(name).prune(model, {"model.layers.0.mlp.up_proj": 0.5}, context)


def _errors(dense: nn.Module, model: nn.Module, context: PruneContext) -> dict[str, float]:
    """Per layer: squared reconstruction error of its output on its dense calibration inputs."""
    layers = linear_layers(dense, context.protected)
    inputs: dict[str, list[torch.Tensor]] = {}
    capture_inputs(dense, layers, context.calibration_batches, "test", lambda n, x: inputs.setdefault(n, []).append(x))
    with torch.no_grad():
        return {n: float((torch.cat(inputs[n]) @ (layer.weight - model.get_submodule(n).weight).T).pow(2).sum())
                for n, layer in layers.items()}


def _pruned(dense: nn.Module, name: str, context: PruneContext) -> nn.Module:
    model = copy.deepcopy(dense)
    method = get_method(name)
    method.prune(model, dict.fromkeys(method.candidates(model, context), 0.5), context)
    return model


def _plant_outliers(model: nn.Module) -> None:
    """A few hidden features 20x larger at every decoder layer's inputs (the outlier features of real LLMs)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 20
            layer.post_attention_layernorm.weight[:4] *= 20


@pytest.mark.parametrize("kind", DECODER_FAMILIES)
def test_sparsegpt_beats_magnitude_at_half_on_every_layer(kind: str) -> None:
    dense, context = _setup(kind)
    magnitude = _errors(dense, _pruned(dense, "l1_unstructured", context), context)
    sparsegpt = _errors(dense, _pruned(dense, "sparsegpt", context), context)
    assert all(sparsegpt[n] < magnitude[n] for n in magnitude), (sparsegpt, magnitude)


@pytest.mark.parametrize("kind", DECODER_FAMILIES)
def test_wanda_and_sparsegpt_beat_magnitude_with_outlier_features(kind: str) -> None:
    """On random weights the inputs after RMSNorm have near-equal norms and Wanda is about magnitude per row
    (sometimes a little worse); with planted outlier features both beat magnitude on every layer, N:M too
    against magnitude under the same N:M pattern."""
    dense, context = _setup(kind)
    _plant_outliers(dense)
    magnitude = _errors(dense, _pruned(dense, "l1_unstructured", context), context)
    for name in UNSTRUCTURED:
        errors = _errors(dense, _pruned(dense, name, context), context)
        assert all(errors[n] < magnitude[n] for n in magnitude), (name, errors, magnitude)
    magnitude = _errors(dense, _pruned(dense, "magnitude_2:4", context), context)
    errors = _errors(dense, _pruned(dense, "sparsegpt_2:4", context), context)
    assert all(errors[n] < magnitude[n] for n in magnitude), ("sparsegpt_2:4", errors, magnitude)
    errors = _errors(dense, _pruned(dense, "wanda_2:4", context), context)
    assert sum(errors.values()) < sum(magnitude.values())


def test_to_semi_structured_on_cuda() -> None:
    if not torch.cuda.is_available() or not hasattr(torch.sparse, "to_sparse_semi_structured"):
        pytest.skip("semi-structured sparse kernels need CUDA")
    from autoprune.methods.llm import to_semi_structured

    model, context = _setup("llama")
    get_method("wanda_2:4").prune(model, dict.fromkeys(get_method("wanda_2:4").candidates(model, context), 0.5),
                                  context)
    model = model.to("cuda", torch.float16)
    ids = _ids(1, 16).cuda()
    with torch.no_grad():
        before = model(ids).logits
        assert to_semi_structured(model) == list(semi_structured_layers(model))
        torch.testing.assert_close(model(ids).logits, before, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------- OWL


@pytest.mark.parametrize("kind", DECODER_FAMILIES)
def test_owl_mean_is_the_target_and_outliers_get_less_sparsity(kind: str) -> None:
    dense = tiny_decoder(kind, layers=4)
    with torch.no_grad():  # plant outlier input features in blocks 1 and 3
        for index in (1, 3):
            block = dense.model.layers[index]
            block.input_layernorm.weight[:4] *= 20
            block.post_attention_layernorm.weight[:4] *= 20
    batches = [(_ids(2, 16), None)]
    allocation = owl_allocation(dense, batches, 0.5, protected=frozenset({"lm_head"}))
    assert list(allocation) == [f"model.layers.{i}" for i in range(4)]
    assert abs(sum(allocation.values()) / 4 - 0.5) < 1e-6
    assert max(allocation[b] for b in ("model.layers.1", "model.layers.3")) < min(
        allocation[b] for b in ("model.layers.0", "model.layers.2"))
    assert max(allocation.values()) - min(allocation.values()) <= 2 * 0.08 + 1e-9
    for target, lam in ((0.7, 0.05), (0.3, 0.0)):
        other = owl_allocation(dense, batches, target, m=3.0, lam=lam, protected=frozenset({"lm_head"}))
        assert abs(sum(other.values()) / len(other) - target) < 1e-6
    targets = layer_targets(dense, allocation, frozenset({"lm_head"}))
    assert len(targets) == 4 * 7 and targets["model.layers.1.mlp.up_proj"] == allocation["model.layers.1"]
    context = PruneContext(example_inputs=batches[0][0], calibration_batches=batches, protected=frozenset({"lm_head"}))
    get_method("wanda").prune(dense, targets, context)  # the allocation is a plan the methods accept


def test_owl_without_blocks_and_out_of_range() -> None:
    model, context = _setup("mlp")
    with torch.no_grad():
        model.body[0].weight[:, :2] *= 30  # outliers in the first layer only
    assert decoder_blocks(model, ["body.0", "body.3"]) == {"body.0": ["body.0"], "body.3": ["body.3"]}
    allocation = owl_allocation(model, context.calibration_batches, 0.4, protected=context.protected)
    assert set(allocation) == {"body.0", "body.3"} and abs(sum(allocation.values()) / 2 - 0.4) < 1e-6
    assert allocation["body.0"] < allocation["body.3"]
    with pytest.raises(ValueError, match="lower lambda"):
        owl_allocation(model, context.calibration_batches, 0.05, lam=0.2, protected=context.protected)
