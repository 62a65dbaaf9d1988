"""Llama-family decoders (Llama, Mistral, Qwen2 from tiny random configs) and the causal-LM task.

The method contract on these decoders (shrunk logits equal the masked dense ones, ``replay`` repeats the
surgery, ``generate()`` with the KV cache gives what it gives without one, one SGD step) is checked for
every method by tests/test_methods_contract.py; here what the Llama-family surgery does to the modules
(key/value groups, SwiGLU sizes, layer indices of the cache), uneven pruning across layers, and the
task: perplexity is 1 for a perfect model and the study minimizes it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import DECODER_FAMILIES, Logits, tiny_decoder

import autoprune
from autoprune.measure import evaluate_perplexity
from autoprune.methods import PruneContext, RemovedBlock, get_method
from autoprune.methods.attention import scan_attention, scan_mlps
from autoprune.training import causal_lm_loss

pytest.importorskip("transformers")
torch.set_num_threads(1)

IDS = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def _context() -> PruneContext:
    return PruneContext(example_inputs=IDS[:1], protected=frozenset({"lm_head"}))


def _check_generation_and_training(model: nn.Module) -> None:
    """Greedy generation with the KV cache equals generation without it; one SGD step on the LM loss."""
    prompt = IDS[:1, :5]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 11) and torch.equal(cached, uncached)
    model.train()
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_gqa_heads_remove_whole_key_value_groups(family: str) -> None:
    dense = tiny_decoder(family)
    method, context = get_method("attention_heads"), _context()
    units = method.candidates(dense, context)
    assert units == [f"model.layers.{i}.self_attn" for i in range(3)]
    assert method.unit_size(dense, units[0]) == 4  # parts are the 4 key/value heads, 2 query heads each
    model = copy.deepcopy(dense)
    removed = method.prune(model, {units[0]: 0.5, units[2]: 0.25}, context)
    assert [len(removed[u]) for u in units[::2]] == [2, 1]
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (32, 16, 16)
    assert (attn.o_proj.in_features, attn.num_heads, attn.num_key_value_heads) == (32, 4, 2)
    assert attn.num_key_value_groups == 2 and attn.head_dim == 8  # queries per key/value head unchanged
    assert model.model.layers[2].self_attn.num_key_value_heads == 3
    assert model.config.num_key_value_heads == 4  # the shared config keeps the dense counts
    assert scan_attention(model)[0][units[0]].num_heads == 2
    _check_generation_and_training(model)  # layers with 2, 4 and 3 key/value heads share one KV cache


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_swiglu_neurons_shrink_gate_up_and_down_together(family: str) -> None:
    dense = tiny_decoder(family)
    method, context = get_method("mlp_neurons"), _context()
    units = method.candidates(dense, context)
    assert units == [f"model.layers.{i}.mlp.up_proj" for i in range(3)]
    model = copy.deepcopy(dense)
    removed = method.prune(model, {units[1]: 0.5}, context)
    mlp = model.model.layers[1].mlp
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (64, 64, 64)
    assert mlp.intermediate_size == 64 and model.model.layers[0].mlp.intermediate_size == 128
    assert len(removed[units[1]]) == 64 and scan_mlps(model)[units[1]].down.in_features == 64


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_decoder_layer_removal_keeps_the_cache_indices_right(family: str) -> None:
    dense = tiny_decoder(family)
    method, context = get_method("remove_block"), _context()
    assert method.candidates(dense, context) == [f"model.layers.{i}" for i in range(3)]
    model = copy.deepcopy(dense)
    assert method.prune(model, {"model.layers.0": 1.0, "model.layers.1": 0.0}, context) == {
        "model.layers.0": [0], "model.layers.1": []}
    assert isinstance(model.get_submodule("model.layers.0"), RemovedBlock)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert dict(model.named_modules()).keys() >= {"model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj"}
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 2
    # the other methods still address the remaining layers by their dense names, and skip the removed one
    heads = get_method("attention_heads")
    heads.prune(model, {"model.layers.0.self_attn": 0.5, "model.layers.2.self_attn": 0.5}, context)
    assert model.model.layers[1].self_attn.num_key_value_heads == 2
    again = copy.deepcopy(dense)
    method.replay(again, {"model.layers.0": [0]}, context)
    assert again.config.num_hidden_layers == 2
    _check_generation_and_training(model)


class PerfectLM(nn.Module):
    """Always sure of the right next token (it peeks at the labels through the inputs)."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.tensor(60.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        following = torch.roll(ids, -1, dims=1)
        return self.scale * nn.functional.one_hot(following, self.vocab).float()


def test_perplexity_of_perfect_and_uniform_models() -> None:
    ids = torch.randint(0, 16, (8, 10), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(ids, ids), batch_size=4)
    assert evaluate_perplexity(PerfectLM(), loader) == pytest.approx(1.0, abs=1e-6)
    uniform = PerfectLM()
    uniform.scale.data.zero_()
    assert evaluate_perplexity(uniform, loader) == pytest.approx(16.0, rel=1e-5)
    labels = ids.clone()
    labels[:, :5] = -100  # nothing predicted there: only 4 tokens per row count
    assert evaluate_perplexity(uniform, DataLoader(TensorDataset(ids, labels), batch_size=4)) == pytest.approx(16.0)


def test_causal_lm_loss_equals_hugging_face_labels_loss() -> None:
    model = tiny_decoder("qwen2")
    with torch.no_grad():
        out = model(IDS, labels=IDS)
    assert math.isclose(float(causal_lm_loss(out, IDS)), float(out.loss), rel_tol=1e-5)
    assert math.isclose(float(causal_lm_loss(out.logits, IDS)), float(out.loss), rel_tol=1e-5)



def test_causal_lm_search_minimizes_perplexity(tmp_path: Path) -> None:
    model = Logits(tiny_decoder("llama", layers=2))
    ids = torch.randint(1, 128, (24, 16), generator=torch.Generator().manual_seed(1))
    config = {"study": {"name": "lm", "n_trials": 2, "sampler": "random", "baselines": []},
              "work_dir": str(tmp_path / "work"), "model": {"task": "causal_lm"},
              "space": {"methods": ["attention_heads", "mlp_neurons"], "sparsity": {"low": 0.0, "high": 0.5,
                                                                                     "step": 0.25}},
              "finetune": {"epochs": 1, "max_batches": 2, "optimizer": "sgd", "lr": 0.01},
              "latency": {"rounds": 1, "min_run_time": 0.005}, "execution": {"backend": "in_process"}}
    search = autoprune.Search(config, model=model, train_data=TensorDataset(ids[:16]),
                              val_data=DataLoader(TensorDataset(ids[16:]), batch_size=4))
    summary = search.run()
    assert (summary.completed, summary.failed) == (2, 0)
    study = search.study
    assert study.directions[0].name == "MINIMIZE" and study.metric_names[0] == "perplexity"
    assert study.user_attrs["autoprune.objective"] == {"name": "perplexity", "direction": "minimize"}
    assert study.user_attrs["autoprune.dense"]["metric"] == "perplexity"
    values = [t.values[0] for t in study.trials]
    assert all(1.0 < v < 1000 for v in values)  # random weights over 128 tokens: near 128
    assert search.front()


def test_causal_lm_task_mistakes_name_the_field(tmp_path: Path) -> None:
    ids = torch.randint(1, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    data = {"train_data": TensorDataset(ids), "val_data": TensorDataset(ids)}
    base = {"study": {"name": "lm"}, "work_dir": str(tmp_path), "model": {"task": "causal_lm"}}
    classifier = nn.Sequential(nn.Embedding(128, 8), nn.Flatten(), nn.Linear(128, 3))
    with pytest.raises(autoprune.errors.ConfigError, match=r"field 'model\.task': causal_lm expects the model to "
                                                           r"return logits \[batch, length, vocab\].*\[8, 3\]"):
        autoprune.Search(base, model=classifier, **data).run()
    small_vocab = Logits(tiny_decoder("llama", layers=1))
    with pytest.raises(autoprune.errors.ConfigError, match=r"token ids from 200 to 200, but the model's logits "
                                                           r"give a vocabulary of 128"):
        autoprune.Search(base, model=small_vocab, train_data=TensorDataset(ids, torch.full_like(ids, 200)),
                         val_data=TensorDataset(ids, torch.full_like(ids, 200))).run()
    screened = {**base, "finetune": {"screening": {"enabled": True}}}
    with pytest.raises(autoprune.errors.ConfigError, match=r"field 'finetune\.screening'"):
        autoprune.Search(screened, model=small_vocab, **data).run()
    assert not (tmp_path / "optuna.db").exists()
