"""Attention heads and feed-forward neurons: exact MHA replacement, head choice,
Hugging Face-style layouts, fine-tuning after pruning, unsupported layouts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from zoo import ZOO, HFStyleAttention, ZooEntry, fine_tune

from autoprune.errors import UnsupportedLayerError
from autoprune.methods import PruneContext, get_method
from autoprune.methods.attention import SlicedMultiheadAttention, scan_attention, scan_mlps

torch.set_num_threads(1)


def _context(entry: ZooEntry | None = None, example: torch.Tensor | None = None, **kwargs) -> PruneContext:
    if entry is not None:
        kwargs.setdefault("protected", frozenset({entry.head}))
        example = entry.example(2)
    return PruneContext(example_inputs=example, **kwargs)


@pytest.mark.parametrize("batch_first", [True, False])
def test_sliced_attention_reproduces_multihead_attention(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    sliced = SlicedMultiheadAttention.from_torch(mha).eval()
    b, s = 3, 5
    x = torch.randn(b, s, 16) if batch_first else torch.randn(s, b, 16)
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    for kwargs in (
        {},
        {"key_padding_mask": padding},
        {"attn_mask": causal},
        {"attn_mask": causal.float() * -1e4},
    ):
        want, want_w = mha(x, x, x, **kwargs)
        got, got_w = sliced(x, x, x, **kwargs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
    unbatched = torch.randn(s, 16)
    torch.testing.assert_close(
        sliced(unbatched, unbatched, unbatched)[0], mha(unbatched, unbatched, unbatched)[0]
    )


def test_heads_pruned_transformer_fine_tunes_and_keeps_the_encoder_fast_path_off() -> None:
    entry = ZOO["transformer"]
    model = entry.build(seed=2)
    context = _context(entry)
    removed = get_method("attention_heads").prune(
        model, {"encoder.layers.0.self_attn": 0.5, "encoder.layers.1.self_attn": 0.25}, context
    )
    assert [len(v) for v in removed.values()] == [2, 1]
    get_method("mlp_neurons").prune(model, {"encoder.layers.0.linear1": 0.5}, context)
    attn = model.encoder.layers[0].self_attn
    assert isinstance(attn, SlicedMultiheadAttention) and attn.num_heads == 2 and attn.embed_dim == 16
    assert attn.q_proj.weight.shape == (8, 16) and attn.out_proj.weight.shape == (16, 8)
    assert model.encoder.use_nested_tensor is False
    # padding masks in eval/no_grad: the path TransformerEncoder would take fused kernels on
    x = entry.example(3)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[:, -1] = True
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.encoder(model.embed(x), src_key_padding_mask=padding)).all()
    losses = fine_tune(model, entry)
    assert losses[-1] < losses[0]


def test_high_ratio_keeps_one_head() -> None:
    entry = ZOO["hf"]
    model = entry.build()
    get_method("attention_heads").prune(model, {"layers.0.self_attn": 0.9}, _context(entry))
    attn = model.layers[0].self_attn
    assert attn.num_heads == 1 and attn.q_proj.out_features == attn.head_dim == 4
    assert "layers.0.self_attn" not in get_method("attention_heads").candidates(model, _context(entry))
    model(entry.example(2)).sum().backward()


def test_weakest_head_goes_first() -> None:
    entry = ZOO["hf"]
    model = entry.build(seed=3)
    attn = model.layers[1].self_attn
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight[8:12] *= 1e-3
            lin.bias[8:12] *= 1e-3
        attn.o_proj.weight[:, 8:12] *= 1e-3
    removed = get_method("attention_heads").prune(
        model, {"layers.1.self_attn": 0.25}, _context(entry)
    )
    assert removed == {"layers.1.self_attn": [2]}


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.all_head_size = hidden
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size), dim=-1)
        return (w @ v).transpose(1, 2).reshape(b, s, self.all_head_size)


class BertSelfOutput(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class BertAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self = BertSelfAttention()
        self.output = BertSelfOutput()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x))


def test_bert_layout_with_sibling_output_projection() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(BertAttention()).eval()
    x = torch.randn(2, 5, 16)
    context = _context(example=x)
    method = get_method("attention_heads")
    assert method.candidates(model, context) == ["0.self"]
    dense = copy.deepcopy(model)
    removed = method.prune(model, {"0.self": 0.5}, context)["0.self"]
    attn = model[0].self
    assert (
        attn.num_attention_heads == 2 and attn.all_head_size == 8 and model[0].output.dense.in_features == 8
    )
    with torch.no_grad():
        for h in removed:
            dense[0].output.dense.weight[:, h * 4 : (h + 1) * 4] = 0
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)


class GQAAttention(HFStyleAttention):
    """Grouped-query attention: 4 query heads share 2 key/value heads."""

    def __init__(self) -> None:
        super().__init__(16, 4)
        self.num_key_value_heads = 2
        self.k_proj = nn.Linear(16, 8)
        self.v_proj = nn.Linear(16, 8)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        kv_shape = (b, s, self.num_key_value_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(kv_shape).transpose(1, 2).repeat_interleave(2, dim=1)
        v = self.v_proj(hidden_states).view(kv_shape).transpose(1, 2).repeat_interleave(2, dim=1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        return self.o_proj((weights @ v).transpose(1, 2).reshape(b, s, -1))


def test_grouped_query_attention_is_unsupported() -> None:
    model = nn.Sequential(GQAAttention())
    context = _context(example=torch.randn(1, 3, 16))
    method = get_method("attention_heads")
    assert method.candidates(model, context) == []
    assert "0" in scan_attention(model)[1]
    with pytest.raises(UnsupportedLayerError) as info:
        method.prune(model, {"0": 0.5}, context)
    assert "grouped-query" in str(info.value) and "space.exclude" in str(info.value)
    # and the generic channel methods leave its projections alone too
    assert get_method("l1_structured").candidates(model, context) == []


class GatedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 24), nn.Linear(8, 24)
        self.down_proj = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_gated_mlp_neurons_match_the_masked_dense_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(GatedMLP())
    x = torch.randn(4, 8)
    context = _context(example=x)
    assert get_method("mlp_neurons").candidates(model, context) == ["0.up_proj"]
    dense = copy.deepcopy(model)
    removed = get_method("mlp_neurons").prune(model, {"0.up_proj": 0.5}, context)["0.up_proj"]
    assert len(removed) == 12 and model[0].gate_proj.out_features == 12 == model[0].down_proj.in_features
    with torch.no_grad():
        dense[0].down_proj.weight[:, removed] = 0
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)


def test_mlp_neurons_units_and_errors() -> None:
    entry = ZOO["hf"]
    model = entry.build()
    assert list(scan_mlps(model)) == ["layers.0.mlp.fc1", "layers.1.mlp.fc1"]
    with pytest.raises(UnsupportedLayerError, match="feed-forward"):
        get_method("mlp_neurons").prune(model, {"layers.0.mlp.fc2": 0.5}, _context(entry))


