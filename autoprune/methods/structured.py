"""Structured (channel) pruning through Torch-Pruning's dependency graph.

The unit is a dependency group: the set of layers whose channels must be cut
together (a residual stream, the inputs of a concatenation, a depthwise conv
and its neighbours). It is named by its root layer, the first ``Conv*d`` /
``Linear`` in model order whose output channels the group removes. A ratio
``r`` removes ``round(r * C)`` of the root's ``C`` output channels (and the
coupled channels everywhere in the group); with ``context.round_to`` the kept
count is rounded to a multiple of it; at least one channel stays. Layers
really shrink, so parameters and MACs go down.

Scoring, planning and surgery are separate: the method's
:class:`~.importance.Importance` scores the channels of each group (through the
matching Torch-Pruning group importance), the planner turns ratios into exact
channel counts, and Torch-Pruning's ``BasePruner`` (``pruning_ratio_dict``, one
entry per root) cuts them; the reached count is checked afterwards and a
mismatch raises. :meth:`StructuredMethod.replay` cuts given channels through the
dependency graph (rewinding).

Not candidates: groups that change the output size of a ``context.protected``
module (those go to ``ignored_layers``), groups coupled to attention (an
``nn.MultiheadAttention`` or the q/k/v/o projections of an attention block:
use ``attention_heads`` and ``mlp_neurons``), groups with one channel and, for
``bn_scale_structured``, groups without BatchNorm. Asking for such a unit
raises :class:`~autoprune.errors.UnsupportedLayerError` naming it.

Hugging Face decoder LMs (``transformers`` models that generate: Llama, Mistral, Qwen2...) are refused with
:class:`~autoprune.errors.UnsupportedLayerError` before tracing: Torch-Pruning's trace of a raw one fails
on its ``ModelOutput``, and of one wrapped to return logits runs for many minutes (rotary embeddings and
the causal mask) without a usable group. Their structure is pruned by ``attention_heads`` (grouped-query
heads), ``mlp_neurons`` (SwiGLU neurons) and ``remove_block`` (decoder layers).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import AutopruneError, UnsupportedLayerError
from ._common import check_indices, check_runs, live_targets, preserved_modes, unknown_unit
from .attention import attention_members
from .base import PruneContext, PruningMethod, Removed, check_ratio
from .importance import Importance, Unit, get_importance, prepare
from .registry import register_method

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class ChannelGroup:
    """One dependency group, named by its root layer; ``reason`` says why it is
    not prunable (None when it is)."""

    root: str
    module: nn.Module
    channels: int
    members: list[str] = field(default_factory=list)
    has_batchnorm: bool = False
    reason: str | None = None
    group: Any = None  # the Torch-Pruning group


def _refuse_decoder_lms(method: str, model: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` when ``model`` holds a Hugging Face decoder LM (module docstring)."""
    transformers = sys.modules.get("transformers")  # never imported here: a model holding one has imported it
    mixin = getattr(transformers, "GenerationMixin", None)
    if mixin is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, mixin):
            raise UnsupportedLayerError(
                f"{method} cannot prune {type(module).__name__} (at {name or 'the model root'!r}): Torch-Pruning's "
                "dependency graph does not trace a transformers decoder LM; prune its structure with "
                "attention_heads, mlp_neurons and remove_block, or its weights with an unstructured method")


def _forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs)


def _out_channels(dg: tp.DependencyGraph, module: nn.Module) -> int:
    return int(dg.get_out_channels(module))


def scan_groups(
    dg: tp.DependencyGraph, model: nn.Module, ignored: list[nn.Module], needs_batchnorm: bool = False
) -> dict[str, ChannelGroup]:
    """All groups of ``dg`` with a Conv/Linear root, keyed by root name, in model order."""
    names = {module: name for name, module in model.named_modules()}
    order = {module: index for index, module in enumerate(names)}
    attention = attention_members(model)
    found: dict[str, ChannelGroup] = {}
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
        touched = [dep.target.module for dep, _ in group]
        outs = [dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)]
        roots = sorted((m for m in outs if isinstance(m, ROOT_TYPES) and m in names), key=order.__getitem__)
        if not roots:
            continue
        root = roots[0]
        entry = ChannelGroup(
            names[root],
            root,
            _out_channels(dg, root),
            members=[names[m] for m in sorted({m for m in touched if m in names}, key=order.__getitem__)],
            has_batchnorm=any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in touched),
            group=group,
        )
        blocks = sorted({attention[m] for m in touched if m in attention})
        if blocks:
            entry.reason = (
                f"its channels are coupled to attention block {blocks[0]!r}, which generic channel pruning "
                "breaks (use attention_heads or mlp_neurons)"
            )
        elif entry.channels < 2:
            entry.reason = "its group has a single channel"
        elif needs_batchnorm and not entry.has_batchnorm:
            entry.reason = "its group has no BatchNorm to score"
        found[entry.root] = entry
    return dict(sorted(found.items(), key=lambda item: order[item[1].module]))


class _GroupScores:
    """The importance callable Torch-Pruning's pruner asks: an autoprune importance on a group."""

    def __init__(self, importance: Importance, context: PruneContext, names: Mapping[nn.Module, str]) -> None:
        self.importance, self.context, self.names = importance, context, names

    def __call__(self, group: tp.Group) -> torch.Tensor:
        dep, idxs = group[0]
        unit = Unit(self.names.get(dep.target.module, ""), len(idxs), group=group)
        return self.importance.scores(unit, self.context)


class StructuredMethod(PruningMethod):
    """Channel pruning of dependency groups, ranked by a pluggable importance:
    ``StructuredMethod("l1_structured", "l1")``."""

    family = "structured"
    indexed = True

    def __init__(self, name: str, importance: str | Importance) -> None:
        self.name = name
        self.importance = get_importance(importance)

    def candidates(self, model: nn.Module, context: PruneContext) -> list[str]:
        _refuse_decoder_lms(self.name, model)
        with preserved_modes(model):
            ignored = _protected_modules(model, context)
            dg = tp.DependencyGraph().build_dependency(model, context.example_inputs, forward_fn=_forward)
            groups = scan_groups(dg, model, _expand(ignored), self.importance.needs_batchnorm)
        return [name for name, group in groups.items() if group.reason is None]

    def unit_size(self, model: nn.Module, unit: str) -> int | None:
        """Output channels of layer ``unit`` (None when there is no such Conv/Linear layer)."""
        module = dict(model.named_modules()).get(unit)
        size = getattr(module, "out_channels", None) or getattr(module, "out_features", None)
        return size if isinstance(size, int) else None

    def prune(self, model: nn.Module, targets: Mapping[str, float], context: PruneContext) -> Removed:
        requested, targets = list(targets), live_targets(model, targets)
        modules = dict(model.named_modules())
        names_of = {module: name for name, module in modules.items()}
        for name, ratio in targets.items():
            check_ratio(self.name, name, ratio, context)
        # Provisional per-root ratios; corrected below once the groups are known.
        ratio_dict = {
            modules[name]: ratio
            for name, ratio in targets.items()
            if ratio > 0 and isinstance(modules.get(name), ROOT_TYPES)
        }
        with preserved_modes(model):
            ignored = _protected_modules(model, context)
            pruner = tp.pruner.BasePruner(
                model,
                context.example_inputs,
                importance=_GroupScores(self.importance, context, names_of),
                pruning_ratio=0.0,
                pruning_ratio_dict=ratio_dict,
                ignored_layers=ignored,
                root_module_types=list(ROOT_TYPES),
                forward_fn=_forward,
            )
            groups = scan_groups(pruner.DG, model, pruner.ignored_layers, self.importance.needs_batchnorm)
            counts = self._plan(model, groups, targets, context)
            if not counts:
                return {name: [] for name in requested}
            # Exact counts: the pruner keeps int(C * (1 - r)) channels, so r = (n - 0.5) / C keeps C - n.
            for module in ratio_dict:
                name = names_of[module]
                ratio = (counts[name] - 0.5) / groups[name].channels if name in counts else 0.0
                pruner.pruning_ratio_dict[module] = pruner.iterative_pruning_ratio_scheduler(ratio, 1)
            units = [Unit(name, groups[name].channels, group=groups[name].group) for name in counts]
            prepare(self.name, self.importance, model, units, context)
            removed = self._cut(pruner, groups, counts)
            model.zero_grad(set_to_none=True)
        for name, count in counts.items():
            reached = groups[name].channels - _out_channels(pruner.DG, groups[name].module)
            if reached != count or len(removed.get(name, [])) != count:
                raise AutopruneError(
                    f"{self.name}: Torch-Pruning removed {reached} of {groups[name].channels} channels of "
                    f"group {name!r} instead of the planned {count}"
                )
        check_runs(self.name, model, context, list(counts))
        return {name: removed.get(name, []) for name in requested}

    def _plan(
        self,
        model: nn.Module,
        groups: dict[str, ChannelGroup],
        targets: Mapping[str, float],
        context: PruneContext,
    ) -> dict[str, int]:
        """Channels to remove per root; raises for units that are not candidates."""
        prunable = [name for name, group in groups.items() if group.reason is None]
        counts = {}
        for name, ratio in targets.items():
            group = groups.get(name)
            if group is None or group.reason is not None:
                raise unknown_unit(self.name, model, name, prunable, _why_not(name, groups, context))
            count = self.removal_count(group.channels, ratio, context)
            if count > 0:
                counts[name] = count
        return counts

    def _cut(
        self, pruner: tp.pruner.BasePruner, groups: dict[str, ChannelGroup], counts: dict[str, int]
    ) -> dict[str, list[int]]:
        by_module = {groups[name].module: name for name in counts}
        removed: dict[str, list[int]] = {}
        for group in pruner.step(interactive=True):
            hits = [
                (by_module[dep.target.module], idxs)
                for dep, idxs in group
                if dep.target.module in by_module and pruner.DG.is_out_channel_pruning_fn(dep.handler)
            ]
            if len(hits) != 1:
                raise AutopruneError(f"{self.name}: Torch-Pruning proposed a group outside the plan: {group}")
            name, idxs = hits[0]
            removed[name] = sorted(int(i) for i in idxs)
            group.prune()
        return removed

    def replay(self, model: nn.Module, removed: Mapping[str, Sequence[int]], context: PruneContext) -> None:
        """Cut the given output channels of each group root (and everything coupled to them)."""
        if not any(removed.values()):
            return
        with preserved_modes(model):
            dg = tp.DependencyGraph().build_dependency(model, context.example_inputs, forward_fn=_forward)
            for unit, idxs in removed.items():
                if not idxs:
                    continue
                root = model.get_submodule(unit)
                drop = check_indices(self.name, unit, idxs, _out_channels(dg, root))
                fn = dg.get_pruner_of_module(root).prune_out_channels
                dg.get_pruning_group(root, fn, idxs=drop).prune()

    def __repr__(self) -> str:
        return f"StructuredMethod({self.name!r}, {self.importance!r})"


def _protected_modules(model: nn.Module, context: PruneContext) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[name] for name in sorted(context.protected) if name in modules]


def _expand(modules: list[nn.Module]) -> list[nn.Module]:
    return [sub for module in modules for sub in module.modules()]


def _why_not(name: str, groups: dict[str, ChannelGroup], context: PruneContext) -> str | None:
    if name in context.protected:
        return "it is protected (its output size is fixed)"
    if name in groups:
        return groups[name].reason
    owner = next((group for group in groups.values() if name in group.members), None)
    if owner is None:
        return None
    if owner.reason is not None:
        return f"it belongs to group {owner.root!r}, which is not prunable: {owner.reason}"
    return f"it is pruned together with its dependency group; target the group's root {owner.root!r}"


#: Registered channel methods: ``<importance>_structured`` (see :mod:`.importance`): l1 / l2
#: group norm of each channel's weights (mean over the group's layers); taylor ``|w * dL/dw|``
#: per channel, gradients summed over the calibration batches (eval mode; needs
#: ``context.calibration_batches``); bn_scale ``|gamma|`` (network slimming; only groups with
#: BatchNorm); random (reproducible under ``torch.manual_seed``).
STRUCTURED_IMPORTANCES = ("l1", "l2", "taylor", "bn_scale", "random")
for _importance in STRUCTURED_IMPORTANCES:
    register_method(
        f"{_importance}_structured", partial(StructuredMethod, f"{_importance}_structured", _importance)
    )
