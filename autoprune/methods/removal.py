"""Layer removal: replace whole residual blocks by an identity.

Candidate rule (:func:`find_blocks`), from one forward pass on
``context.example_inputs`` with hooks on every submodule. A module is a block
when

1. it is not the model itself, is called exactly once and returns a single
   tensor with the same shape as its first tensor input;
2. it owns parameters (so bare activations, pooling and dropout never count);
3. it contains an addition skip: somewhere inside, an ``add`` takes the block's
   input tensor itself as one operand (``x + f(x)``, ``out += identity``),
   found by walking the autograd graph from the output back to the input. This
   rules out a lone shape-preserving conv, which would otherwise qualify;
4. it is not protected, does not contain a protected module, and no
   smaller block lies inside it (the innermost blocks win, so a ``Sequential``
   of blocks or a whole ``TransformerEncoder`` is not a unit, its layers are).

``prune`` replaces each target with ratio >= 0.5 by :class:`RemovedBlock` (an
``nn.Identity`` that also accepts and ignores extra arguments, as
``nn.TransformerEncoder`` passes masks to its layers); ratios below 0.5 leave the
block in place. A Hugging Face decoder layer (a ``layers`` ``nn.ModuleList`` under a model
whose ``config.num_hidden_layers`` counts them, each layer's ``self_attn.layer_idx`` indexing
the KV cache) is taken out of the decoder's loop: the list becomes a :class:`DecoderLayerList`
that iterates, slices and counts only live layers, ``config.num_hidden_layers`` (and
``config.layer_types``) shrink and the live layers' ``layer_idx`` are renumbered, so that
``generate()`` with a cache still works; the stand-in keeps the slot, and so the names.
It reports ``[0]`` (the block, its only part) for a removed block
and ``[]`` for a kept one; ``replay`` removes the blocks reported so. Module
names of everything else stay the same; units of the other families that lay
inside a removed block are skipped by those methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch
from torch import nn
from torch.autograd.graph import Node, get_gradient_edge

from ..errors import AutopruneError
from ._common import RemovedBlock, preserved_modes, set_submodule, unknown_unit
from .base import PruneContext, PruningMethod, Removed
from .registry import register

__all__ = ["DecoderLayerList", "RemoveBlock", "RemovedBlock", "find_blocks"]


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _graph_node(tensor: torch.Tensor) -> Node | None:
    if not tensor.requires_grad:
        return None
    return get_gradient_edge(tensor).node


def _adds_input(output: torch.Tensor, input_node: Node | None, limit: int = 200_000) -> bool:
    """Whether an ``add`` inside the graph from ``input_node`` to ``output`` has the
    input itself as an operand."""
    if input_node is None or output.grad_fn is None:
        return False
    stack, seen = [output.grad_fn], set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is input_node or node in seen:
            continue
        seen.add(node)
        parents = [parent for parent, _ in node.next_functions if parent is not None]
        if node.name().startswith("AddBackward") and any(parent is input_node for parent in parents):
            return True
        stack.extend(parents)
    return False


def find_blocks(
    model: nn.Module, example_inputs: torch.Tensor, protected: frozenset[str] = frozenset()
) -> list[str]:
    """Names of the removable residual blocks of ``model`` (rule in the module docstring)."""
    modules = dict(model.named_modules())
    records: dict[str, dict] = {name: {"calls": 0, "ok": False} for name in modules if name}
    pending: dict[str, tuple[torch.Size, Node | None]] = {}
    handles = []

    def before(name: str):
        def hook(module, args, kwargs):
            tensor = _first_tensor(args, kwargs)
            records[name]["calls"] += 1
            if tensor is not None:
                pending[name] = (tensor.shape, _graph_node(tensor))

        return hook

    def after(name: str):
        def hook(module, args, kwargs, output):
            shape, node = pending.pop(name, (None, None))
            records[name]["ok"] = (
                isinstance(output, torch.Tensor)
                and shape is not None
                and output.shape == shape
                and _adds_input(output, node)
            )

        return hook

    for name, module in modules.items():
        if name and any(True for _ in module.parameters()):
            handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
            handles.append(module.register_forward_hook(after(name), with_kwargs=True))
    inputs = example_inputs.detach().clone()
    if inputs.is_floating_point():
        inputs.requires_grad_(True)
    try:
        with preserved_modes(model), torch.enable_grad():
            model.eval()
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    found = [
        name
        for name, record in records.items()
        if record["ok"]
        and record["calls"] == 1
        and not any(p == name or p.startswith(name + ".") for p in protected)
        and not any(name.startswith(p + ".") for p in protected)
    ]
    return [name for name in found if not any(other.startswith(name + ".") for other in found)]


@register
class RemoveBlock(PruningMethod):
    """Replace residual blocks by an identity (ratio >= 0.5 removes, 0 keeps)."""

    name = "remove_block"
    family = "removal"

    def candidates(self, model: nn.Module, context: PruneContext) -> list[str]:
        return find_blocks(model, context.example_inputs, context.protected)

    def prune(self, model: nn.Module, targets: Mapping[str, float], context: PruneContext) -> Removed:
        for name, ratio in targets.items():
            if not 0.0 <= ratio <= 1.0:
                raise AutopruneError(f"{self.name}: ratio {ratio} for {name!r} is outside [0, 1]")
        chosen = [name for name, ratio in targets.items() if ratio >= 0.5]
        blocks = self.candidates(model, context) if targets else []
        for name in targets:
            if name not in blocks:
                reason = "it is not a residual block whose output shape equals its input shape"
                raise unknown_unit(self.name, model, name, blocks, reason)
        for name in chosen:
            _remove(model, name)
        return {name: [0] if name in chosen else [] for name in targets}

    def replay(self, model: nn.Module, removed: Mapping[str, Sequence[int]], context: PruneContext) -> None:
        """Remove the blocks reported removed (``[0]``)."""
        for name, parts in removed.items():
            if parts:
                try:
                    model.get_submodule(name)
                except AttributeError:
                    raise AutopruneError(f"{self.name}: the model has no block {name!r} to remove") from None
                _remove(model, name)


def _remove(model: nn.Module, name: str) -> None:
    old = model.get_submodule(name)
    replacement = RemovedBlock()
    _keep_encoder_working(model, name, old, replacement)
    set_submodule(model, name, replacement)
    _keep_decoder_working(model, name, old)


class DecoderLayerList(nn.ModuleList):
    """A decoder's ``layers`` with some slots holding :class:`RemovedBlock`: iterating, indexing, slicing
    and ``len`` see only the live layers (Hugging Face decoders loop over ``layers[:num_hidden_layers]``
    and index the cache by position), while ``named_modules`` and ``state_dict`` keep every other
    layer's original name, which the plan's units of the other methods refer to."""

    def _live(self) -> list[nn.Module]:
        return [m for m in self._modules.values() if not isinstance(m, RemovedBlock)]

    def __iter__(self):  # type: ignore[override]
        return iter(self._live())

    def __len__(self) -> int:
        return len(self._live())

    def __getitem__(self, index):  # type: ignore[override]
        return nn.ModuleList(self._live()[index]) if isinstance(index, slice) else self._live()[index]


def _keep_decoder_working(model: nn.Module, name: str, old: nn.Module) -> None:
    """For a Hugging Face decoder layer: drop it from the decoder's loop, its ``config.layer_types``
    entry and ``config.num_hidden_layers``, and renumber the live layers' cache index (``layer_idx``)."""
    parent_name, owner_name = name.rpartition(".")[0], name.rpartition(".")[0].rpartition(".")[0]
    position = getattr(getattr(old, "self_attn", None), "layer_idx", None)
    if not parent_name or not isinstance(position, int):
        return
    layers = model.get_submodule(parent_name)
    config = getattr(model.get_submodule(owner_name) if owner_name else model, "config", None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(getattr(config, "num_hidden_layers", None), int):
        return
    layers.__class__ = DecoderLayerList  # same object and state; only the view of removed slots changes
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == config.num_hidden_layers and position < len(types):
        config.layer_types = types[:position] + types[position + 1 :]
    live = list(layers)
    config.num_hidden_layers = len(live)
    for index, layer in enumerate(live):
        for module in (layer, getattr(layer, "self_attn", None)):
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index


def _keep_encoder_working(model: nn.Module, name: str, old: nn.Module, replacement: RemovedBlock) -> None:
    """``nn.TransformerEncoder.forward`` reads ``layers[0].self_attn.batch_first`` and
    may take a nested-tensor fast path through its layers' weights: give the
    stand-in that attribute and switch the fast path off."""
    parent_name = name.rpartition(".")[0]
    owner_name = parent_name.rpartition(".")[0]
    if not parent_name.endswith("layers"):
        return
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(owner, nn.TransformerEncoder):
        owner.use_nested_tensor = False
        attention = getattr(old, "self_attn", None)
        replacement.self_attn = SimpleNamespace(batch_first=getattr(attention, "batch_first", False))
