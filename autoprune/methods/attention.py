"""Transformer pruning: whole attention heads and feed-forward neurons.

Torch-Pruning's generic channel pruning breaks ``nn.MultiheadAttention`` (the
pruned model fails in backward), so heads are sliced here by hand:

* ``attention_heads`` (unit: the attention module's name; ratio: fraction of
  its heads removed, rounded to whole heads, at least one kept). For a head
  ``h`` the rows ``h*d:(h+1)*d`` of the q, k and v projections and the same
  columns of the output projection are removed; the model dimension stays.
  A stock ``nn.MultiheadAttention`` keeps its packed ``in_proj_weight`` [3E, E]
  and cannot hold fewer heads than ``E / head_dim``, so it is first replaced
  (exactly) by :class:`SlicedMultiheadAttention`, which has separate
  projections and a shrinkable inner dimension. Hugging Face-style blocks
  (child ``Linear`` layers ``q_proj/k_proj/v_proj`` or ``query/key/value``, an
  output projection ``o_proj/out_proj/dense`` or BERT's sibling ``output.dense``,
  and a ``num_heads``-like attribute) are sliced in place and their head-count
  attributes updated. Llama-family attention with grouped-query attention
  (Llama, Mistral, Qwen2 in transformers 5) is pruned by whole key/value
  groups: a part is one key/value head with the query heads that share it (see
  :func:`_grouped_query`); ``num_key_value_heads`` / ``num_heads`` are set on
  the module (the shared config keeps the dense counts). Heads are ranked by the method's importance (default:
  the L2 norm of their q/k/v rows and output columns, weights and biases); the
  weakest go.
* ``mlp_neurons`` (unit: the first feed-forward layer's name, e.g.
  ``encoder.layers.0.linear1``; ratio: fraction of hidden neurons removed,
  rounded (``context.round_to`` applies), at least one kept). Removes rows of
  the up (and gate) projection and the matching columns of the down
  projection, ranked the same way (default: L2 norm). Recognised pairs:
  ``linear1/linear2`` (``nn.TransformerEncoderLayer``), ``fc1/fc2``,
  ``up_proj/down_proj`` (+ ``gate_proj``), ``c_fc/c_proj``, ``w1/w2`` (+ ``w3``)
  and BERT's ``intermediate.dense/output.dense``; the hidden activations between
  them must be element-wise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AutopruneError, UnsupportedLayerError
from ._common import check_indices, check_runs, live_targets, set_submodule, unknown_unit
from .base import PruneContext, PruningMethod, Removed, check_ratio, count_to_remove
from .importance import Importance, Unit, get_importance, prepare
from .registry import register


class SlicedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate q/k/v projections whose inner size
    ``num_heads * head_dim`` may be smaller than ``embed_dim``.

    Same call signature and results as ``nn.MultiheadAttention`` (``add_bias_kv``
    and ``add_zero_attn`` are not supported). The attributes ``in_proj_weight``
    and ``in_proj_bias`` are ``None`` and ``_qkv_same_embed_dim`` is False so that
    ``nn.TransformerEncoderLayer`` never takes its fused fast path, which reads
    packed weights. A 3-D ``attn_mask`` must be built for the current head count.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self._qkv_same_embed_dim = False
        self.in_proj_weight = None
        self.in_proj_bias = None

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> SlicedMultiheadAttention:
        """An exact copy of ``mha`` (same outputs) with separate projections."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedLayerError(
                "nn.MultiheadAttention with add_bias_kv or add_zero_attn cannot have heads pruned; "
                "add it to space.exclude in the config"
            )
        bias = mha.in_proj_bias is not None
        new = cls(
            mha.embed_dim, mha.num_heads, mha.head_dim, mha.kdim, mha.vdim, bias, mha.dropout, mha.batch_first
        )
        e = mha.embed_dim
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.split(e, dim=0)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            for proj, weight, index in zip(
                (new.q_proj, new.k_proj, new.v_proj), weights, range(3), strict=True
            ):
                proj.weight.copy_(weight)
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[index * e : (index + 1) * e])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, length, _ = query.shape
        source = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(b, length, h, d).transpose(1, 2)
        k = self.k_proj(key).reshape(b, source, h, d).transpose(1, 2)
        v = self.v_proj(value).reshape(b, source, h, d).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.reshape(b, h, length, source)
            scores = _add_mask(scores, attn_mask)
        if key_padding_mask is not None:
            scores = _add_mask(scores, key_padding_mask.reshape(b, 1, 1, source))
        weights = torch.softmax(scores, dim=-1)
        out = F.dropout(weights, self.dropout, self.training) @ v
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, h * d))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights if batched else weights.squeeze(0)


def _add_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask


# ----------------------------------------------------------------------------- scanning

_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"), ("wq", "wk", "wv"))
_OUT_NAMES = ("o_proj", "out_proj", "dense", "o", "wo")
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
_MLP_NAMES = (
    ("linear1", "linear2", None),
    ("fc1", "fc2", None),
    ("up_proj", "down_proj", "gate_proj"),
    ("c_fc", "c_proj", None),
    ("w1", "w2", "w3"),
)


@dataclass
class HeadBlock:
    """An attention module whose heads can be removed. ``q``/``k``/``v`` are None
    for a stock ``nn.MultiheadAttention`` (packed weights, converted on pruning)."""

    name: str
    module: nn.Module
    q: nn.Linear | None
    k: nn.Linear | None
    v: nn.Linear | None
    o: nn.Linear
    num_heads: int
    head_dim: int
    group: int = 1
    """Query heads per part: with grouped-query attention a part is one key/value head and the
    ``group`` query heads that share it (q rows and o columns in blocks of ``group * head_dim``)."""


def _child_linear(module: nn.Module, path: str) -> nn.Linear | None:
    try:
        child = module.get_submodule(path)
    except AttributeError:
        return None
    return child if isinstance(child, nn.Linear) else None


def _first_complete(module: nn.Module, candidates: tuple[tuple[str, ...], ...]) -> list[nn.Linear] | None:
    """The first name tuple whose every entry is a ``Linear`` child of ``module``."""
    for names in candidates:
        found = [_child_linear(module, n) for n in names]
        if all(lin is not None for lin in found):
            return found
    return None


def scan_attention(model: nn.Module) -> tuple[dict[str, HeadBlock], dict[str, str]]:
    """Attention blocks of ``model`` by name, and the reasons why other
    attention-looking modules cannot have heads pruned."""
    blocks: dict[str, HeadBlock] = {}
    unsupported: dict[str, str] = {}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            if module.bias_k is not None or module.add_zero_attn:
                unsupported[name] = "nn.MultiheadAttention with add_bias_kv/add_zero_attn is not supported"
                continue
            blocks[name] = HeadBlock(
                name, module, None, None, None, module.out_proj, module.num_heads, module.head_dim
            )
            continue
        if isinstance(module, SlicedMultiheadAttention):
            blocks[name] = HeadBlock(
                name, module, module.q_proj, module.k_proj, module.v_proj, module.out_proj,
                module.num_heads, module.head_dim,
            )  # fmt: skip
            continue
        qkv = _first_complete(module, _QKV_NAMES)
        if qkv is None:
            continue
        q, k, v = qkv
        out = next((lin for n in _OUT_NAMES if (lin := _child_linear(module, n)) is not None), None)
        parent_name = name.rpartition(".")[0] if "." in name else ""
        if out is None and name and parent_name in modules:
            out = _child_linear(modules[parent_name], "output.dense")
        if out is not None and (gqa := _grouped_query(name, module, q, k, v, out)) is not None:
            if isinstance(gqa, str):
                unsupported[name] = gqa
            else:
                blocks[name] = gqa
            continue
        heads = next(
            (getattr(module, a) for a in _HEAD_ATTRS if isinstance(getattr(module, a, None), int)), None
        )
        if heads is None or out is None:
            missing = "a num_heads-like attribute" if heads is None else "an output projection"
            unsupported[name] = f"attention block without {missing}"
            continue
        head_dim = next(
            (getattr(module, a) for a in _HEAD_DIM_ATTRS if isinstance(getattr(module, a, None), int)),
            q.out_features // heads,
        )
        inner = heads * head_dim
        if k.out_features != inner or v.out_features != inner:
            unsupported[name] = "grouped-query attention (k/v with fewer heads than q) is not supported"
        elif q.out_features != inner or out.in_features != inner:
            unsupported[name] = f"projection sizes do not match {heads} heads of {head_dim}"
        else:
            blocks[name] = HeadBlock(name, module, q, k, v, out, heads, head_dim)
    return blocks, unsupported


def _grouped_query(
    name: str, module: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear
) -> HeadBlock | str | None:
    """A Llama-family attention (transformers 5: ``head_dim`` and ``num_key_value_groups`` on the module,
    head counts only in the shared config, so they are read from the projection sizes) as a block whose
    parts are key/value heads, each with its ``num_key_value_groups`` query heads; a reason string when
    the sizes do not fit; None for any other module.

    Removing whole groups keeps ``num_key_value_groups`` (queries per key/value head) unchanged, which
    is what ``repeat_kv`` and the SDPA kernels read; rotary embeddings act per head and are untouched."""
    group, d = getattr(module, "num_key_value_groups", None), getattr(module, "head_dim", None)
    if not isinstance(group, int) or not isinstance(d, int) or group < 1 or d < 1:
        return None
    kv, rest = divmod(k.out_features, d)
    if rest or v.out_features != k.out_features or q.out_features != kv * group * d or o.in_features != q.out_features:
        return (f"projection sizes (q {q.out_features}, k {k.out_features}, v {v.out_features}, o {o.in_features}) "
                f"do not fit {group} query heads of {d} per key/value head")
    return HeadBlock(name, module, q, k, v, o, kv, d, group)


def attention_members(model: nn.Module) -> dict[nn.Module, str]:
    """Every module that belongs to an attention block (the block, its projections),
    mapped to the block's name; generic channel pruning must leave these alone."""
    blocks, unsupported = scan_attention(model)
    members: dict[nn.Module, str] = {}
    modules = dict(model.named_modules())
    for name in unsupported:
        for sub in modules[name].modules():
            members[sub] = name
    for block in blocks.values():
        for sub in (*block.module.modules(), block.q, block.k, block.v, block.o):
            if sub is not None:
                members[sub] = block.name
    return members


# ----------------------------------------------------------------------------- surgery


def _keep_rows(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[keep].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[keep].clone())
    linear.out_features = int(keep.numel())


def _keep_columns(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, keep].clone())
    linear.in_features = int(keep.numel())


def _lowest(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.argsort(scores, stable=True)[:count].tolist())


def _mark_encoders(model: nn.Module) -> None:
    """``nn.TransformerEncoder``'s nested-tensor fast path reads packed attention
    weights: switch it off where a layer's attention was replaced."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(sub, SlicedMultiheadAttention) for sub in module.modules()
        ):
            module.use_nested_tensor = False


@register
class AttentionHeads(PruningMethod):
    """Remove whole attention heads (see the module docstring); heads are ranked by
    ``importance`` over their q/k/v rows and output-projection columns (default l2)."""

    name = "attention_heads"
    family = "structured"
    indexed = True

    def __init__(self, importance: str | Importance = "l2") -> None:
        self.importance = get_importance(importance)

    def candidates(self, model: nn.Module, context: PruneContext) -> list[str]:
        blocks, _ = scan_attention(model)
        return [
            name for name, block in blocks.items() if block.num_heads > 1 and not _touches(block, context)
        ]

    def unit_size(self, model: nn.Module, unit: str) -> int | None:
        blocks, _ = scan_attention(model)
        return blocks[unit].num_heads if unit in blocks else None

    def removal_count(self, size: int, ratio: float, context: PruneContext) -> int:
        """Whole heads: ``round(ratio * size)``, at least one kept (``round_to`` does not apply)."""
        return max(0, min(count_to_remove(size, ratio), size - 1))

    def prune(self, model: nn.Module, targets: Mapping[str, float], context: PruneContext) -> Removed:
        requested, targets = list(targets), live_targets(model, targets)
        blocks, unsupported = scan_attention(model)
        allowed = self.candidates(model, context)
        plan: dict[str, int] = {}
        for name, ratio in targets.items():
            if name not in allowed:
                reason = unsupported.get(name)
                if name in blocks:
                    reason = "it has a single head" if blocks[name].num_heads < 2 else "it is protected"
                raise unknown_unit(self.name, model, name, allowed, reason)
            check_ratio(self.name, name, ratio, context)
            plan[name] = self.removal_count(blocks[name].num_heads, ratio, context)
        chosen = {name: _sliceable(model, blocks[name]) for name, count in plan.items() if count > 0}
        units = [Unit.blocks(name, b.num_heads, (b.q, b.k, b.v), (b.o,)) for name, b in chosen.items()]
        prepare(self.name, self.importance, model, units, context)
        removed: Removed = {name: [] for name in plan}
        for unit in units:
            removed[unit.name] = _lowest(self.importance.scores(unit, context), plan[unit.name])
        for name, block in chosen.items():
            _remove_heads(block, removed[name])
        _mark_encoders(model)
        check_runs(self.name, model, context, list(chosen))
        return {name: removed.get(name, []) for name in requested}

    def replay(self, model: nn.Module, removed: Mapping[str, Sequence[int]], context: PruneContext) -> None:
        """Remove the given heads of each attention block."""
        blocks, _ = scan_attention(model)
        done = []
        for name, heads in removed.items():
            if not heads:
                continue
            if name not in blocks:
                raise AutopruneError(f"{self.name}: the model has no attention block {name!r}")
            drop = check_indices(self.name, name, heads, blocks[name].num_heads)
            _remove_heads(_sliceable(model, blocks[name]), drop)
            done.append(name)
        _mark_encoders(model)
        check_runs(self.name, model, context, done)

    def __repr__(self) -> str:
        return f"AttentionHeads({self.importance!r})"


def _sliceable(model: nn.Module, block: HeadBlock) -> HeadBlock:
    """``block`` with separate q/k/v projections: a stock ``nn.MultiheadAttention`` is
    replaced in ``model`` by an exact :class:`SlicedMultiheadAttention` first."""
    if not isinstance(block.module, nn.MultiheadAttention):
        return block
    sliced = SlicedMultiheadAttention.from_torch(block.module)
    set_submodule(model, block.name, sliced)
    return HeadBlock(
        block.name, sliced, sliced.q_proj, sliced.k_proj, sliced.v_proj, sliced.out_proj,
        sliced.num_heads, sliced.head_dim,
    )  # fmt: skip


def _remove_heads(block: HeadBlock, drop: list[int]) -> None:
    """Slice heads ``drop`` out of ``block`` and update its head-count attributes."""
    h, d, g = block.num_heads, block.head_dim, block.group
    kept_heads = [i for i in range(h) if i not in drop]
    keep = torch.tensor([i * d + j for i in kept_heads for j in range(d)], device=block.o.weight.device)
    wide = torch.tensor([i * g * d + j for i in kept_heads for j in range(g * d)], device=block.o.weight.device)
    for lin, rows in ((block.q, wide), (block.k, keep), (block.v, keep)):
        _keep_rows(lin, rows)
    _keep_columns(block.o, wide)
    new_heads = len(kept_heads)
    module = block.module
    if g > 1 or isinstance(getattr(module, "num_key_value_groups", None), int):
        # per-module counts (the config is shared by every layer and keeps the dense model's numbers)
        module.num_key_value_heads, module.num_heads = new_heads, new_heads * g
        return
    for attr in _HEAD_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, new_heads)
    for attr in ("all_head_size", "inner_dim"):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, new_heads * d)
    if getattr(module, "num_key_value_heads", None) == h:
        module.num_key_value_heads = new_heads


def _touches(block: HeadBlock, context: PruneContext) -> bool:
    names = {n for n, m in block.module.named_modules(prefix=block.name)}
    return block.name in context.protected or bool(names & context.protected)


@dataclass
class MLPUnit:
    """A feed-forward pair: ``up`` (and ``gate``) rows feed ``down``'s columns."""

    name: str
    up: nn.Linear
    down: nn.Linear
    gate: nn.Linear | None
    owner: nn.Module | None = None
    """The module holding the pair; its ``intermediate_size`` (Llama's MLP) follows the surgery."""


def scan_mlps(model: nn.Module) -> dict[str, MLPUnit]:
    """Feed-forward pairs by unit name (the up projection's module name)."""
    units: dict[str, MLPUnit] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for up_name, down_name, gate_name in (*_MLP_NAMES, ("intermediate.dense", "output.dense", None)):
            up, down = _child_linear(module, up_name), _child_linear(module, down_name)
            if up is None or down is None or up.out_features != down.in_features:
                continue
            gate = _child_linear(module, gate_name) if gate_name else None
            if gate is not None and gate.out_features != up.out_features:
                continue
            units[prefix + up_name] = MLPUnit(prefix + up_name, up, down, gate, module)
            break
    return units


@register
class MLPNeurons(PruningMethod):
    """Remove hidden neurons of transformer feed-forward blocks (see the module docstring);
    neurons are ranked by ``importance`` over their up/gate rows and down column (default l2)."""

    name = "mlp_neurons"
    family = "structured"
    indexed = True

    def __init__(self, importance: str | Importance = "l2") -> None:
        self.importance = get_importance(importance)

    def candidates(self, model: nn.Module, context: PruneContext) -> list[str]:
        names = {m: n for n, m in model.named_modules()}
        return [
            name
            for name, unit in scan_mlps(model).items()
            if unit.up.out_features > 1
            and names[unit.up] not in context.protected
            and (unit.gate is None or names[unit.gate] not in context.protected)
        ]

    def unit_size(self, model: nn.Module, unit: str) -> int | None:
        mlps = scan_mlps(model)
        return mlps[unit].up.out_features if unit in mlps else None

    def prune(self, model: nn.Module, targets: Mapping[str, float], context: PruneContext) -> Removed:
        requested, targets = list(targets), live_targets(model, targets)
        mlps = scan_mlps(model)
        allowed = self.candidates(model, context)
        plan: dict[str, int] = {}
        for name, ratio in targets.items():
            if name not in allowed:
                raise unknown_unit(
                    self.name, model, name, allowed, "it is not the first layer of a feed-forward pair"
                )
            check_ratio(self.name, name, ratio, context)
            plan[name] = self.removal_count(mlps[name].up.out_features, ratio, context)
        units = [
            Unit.blocks(name, mlps[name].up.out_features, (mlps[name].up, mlps[name].gate), (mlps[name].down,))
            for name, count in plan.items()
            if count > 0
        ]
        prepare(self.name, self.importance, model, units, context)
        removed: Removed = {name: [] for name in plan}
        for unit in units:
            removed[unit.name] = _lowest(self.importance.scores(unit, context), plan[unit.name])
        for unit in units:
            _remove_neurons(mlps[unit.name], removed[unit.name])
        check_runs(self.name, model, context, [unit.name for unit in units])
        return {name: removed.get(name, []) for name in requested}

    def replay(self, model: nn.Module, removed: Mapping[str, Sequence[int]], context: PruneContext) -> None:
        """Remove the given hidden neurons of each feed-forward pair."""
        mlps = scan_mlps(model)
        done = []
        for name, neurons in removed.items():
            if not neurons:
                continue
            if name not in mlps:
                raise AutopruneError(f"{self.name}: the model has no feed-forward pair {name!r}")
            _remove_neurons(mlps[name], check_indices(self.name, name, neurons, mlps[name].up.out_features))
            done.append(name)
        check_runs(self.name, model, context, done)

    def __repr__(self) -> str:
        return f"MLPNeurons({self.importance!r})"


def _remove_neurons(unit: MLPUnit, drop: list[int]) -> None:
    """Slice hidden neurons ``drop`` out of ``unit`` (up/gate rows, down columns)."""
    if not drop:
        return
    dropped = set(drop)
    kept = [i for i in range(unit.up.out_features) if i not in dropped]
    keep = torch.tensor(kept, device=unit.up.weight.device)
    for lin in (unit.up, unit.gate):
        if lin is not None:
            _keep_rows(lin, keep)
    _keep_columns(unit.down, keep)
    if isinstance(getattr(unit.owner, "intermediate_size", None), int):
        unit.owner.intermediate_size = len(kept)
