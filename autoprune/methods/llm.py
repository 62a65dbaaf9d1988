"""What the one-shot LLM methods (:mod:`.wanda`, :mod:`.sparsegpt`) share: candidates, calibration capture,
the N:M pattern and its record.

Both methods zero weights of ``nn.Linear`` layers from statistics of the layers' *inputs* on
``context.calibration_batches``, with no fine-tuning. The statistics are gathered in one pass: a forward
pre-hook on every pruned layer accumulates them while the calibration batches run through the **dense**
model (all layers at once from dense inputs, not block by block on the inputs of already-pruned blocks
as the reference implementations do; see the modules). Only running sums are kept, never the activations.

Candidates are the ``nn.Linear`` layers whose ``forward`` is called: not ``context.protected`` ones, not the
output embeddings of a Hugging Face model (``get_output_embeddings()``, ``lm_head``) nor any layer tied to an
``nn.Embedding``, and not the ``out_proj`` of an ``nn.MultiheadAttention`` (it is used through
``F.multi_head_attention_forward``, so its inputs cannot be hooked). Embeddings are no ``nn.Linear``.

**N:M (semi-structured)**: ``<method>_2:4`` and ``<method>_4:8`` keep at most N non-zero weights in every M
consecutive weights of a row (input dimension), the pattern sparse tensor cores run. Their sparsity is fixed
at ``1 - N/M`` (0.5 for both): :meth:`OneShotMethod.prune` refuses any other non-zero ratio with
:class:`FixedSparsityError`, and only layers whose ``in_features`` is a multiple of M are candidates. After
pruning, the pattern of each layer is recorded on the model (:func:`semi_structured_layers`, a JSON-able
dict) so that a GPU runtime can convert it (:func:`to_semi_structured`, CUDA only). On CPU nothing is
claimed: the zeros are plain zeros in ``weight``, stored as a bitmask like any unstructured zeros
(:mod:`autoprune.model_files`), held through fine-tuning by :func:`.unstructured.masks_of` /
:func:`.unstructured.apply_masks`, with no speed-up. ``magnitude_2:4`` / ``magnitude_4:8``
(:mod:`.magnitude_nm`) share the candidates, the pattern and its record but score by ``|W|`` alone: no
calibration pass.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import AutopruneError
from ._common import live_targets, preserved_modes, unknown_unit
from .base import PruneContext, PruningMethod, Removed, check_ratio
from .importance import Importance, Unit, prepare

#: Model attribute holding ``{layer name: "N:M"}`` for the layers an N:M method pruned.
SEMI_STRUCTURED_ATTR = "autoprune_semi_structured"
#: N:M patterns registered for each one-shot method (``wanda_2:4``, ``sparsegpt_4:8``...).
PATTERNS: tuple[tuple[int, int], ...] = ((2, 4), (4, 8))


class FixedSparsityError(AutopruneError, ValueError):
    """An N:M method was asked for a sparsity other than its fixed ``1 - N/M``."""


def _tied_to_embedding(model: nn.Module) -> set[int]:
    """Weights of embeddings and of output embeddings: of the model's, or of any module inside it (a Hugging
    Face LM wrapped by the user's ``ids -> logits`` module has its ``lm_head`` one level down)."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        output = getattr(module, "get_output_embeddings", None)
        head = output() if callable(output) else None
        if isinstance(head, nn.Module) and getattr(head, "weight", None) is not None:
            ids.add(id(head.weight))
    return ids


def _skip_reasons(model: nn.Module, protected: frozenset[str], m: int | None) -> dict[str, str]:
    """Every ``nn.Linear`` of ``model`` that is no candidate -> why."""
    tied = _tied_to_embedding(model)
    reasons: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            reasons[f"{name}.out_proj" if name else "out_proj"] = (
                "nn.MultiheadAttention uses its out_proj weight without calling it, so its inputs cannot be captured")
        elif isinstance(module, nn.Linear) and name not in reasons:
            if name in protected:
                reasons[name] = "it is protected (its output size is fixed)"
            elif id(module.weight) in tied:
                reasons[name] = "it is the output embedding (or tied to an embedding)"
            elif m and module.in_features % m:
                reasons[name] = f"its {module.in_features} input features are not a multiple of {m}"
    return reasons


def linear_layers(
    model: nn.Module, protected: frozenset[str] = frozenset(), m: int | None = None
) -> dict[str, nn.Linear]:
    """The candidate ``nn.Linear`` layers of ``model`` by name, in module order (see the module docstring);
    with ``m`` only those whose ``in_features`` is a multiple of ``m``."""
    skip = _skip_reasons(model, protected, m)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in skip
    }


def _call(model: nn.Module, inputs: object) -> object:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def capture_inputs(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    batches: Sequence[object],
    method: str,
    accumulate: Callable[[str, torch.Tensor], None],
) -> None:
    """Run ``batches`` (``(inputs, labels)`` pairs or bare inputs; a dict of inputs is passed as keywords)
    through ``model`` in eval mode without gradients and call ``accumulate(name, x)`` with every input ``x``
    of every layer in ``layers``, as a float32 ``[tokens, in_features]`` matrix.

    PyTorch's fused ``nn.TransformerEncoderLayer`` path (which calls no ``nn.Linear``) is switched off
    meanwhile. Raises when there are no batches or a layer saw no input.
    """
    if not batches:
        raise AutopruneError(f"{method} needs calibration inputs, but context.calibration_batches is empty; "
                             "configure calibration batches or pick a magnitude method")
    seen: set[str] = set()

    def hook(name: str) -> Callable[[nn.Module, tuple[object, ...]], None]:
        def pre_hook(module: nn.Module, args: tuple[object, ...]) -> None:
            x = args[0]
            if isinstance(x, torch.Tensor):
                seen.add(name)
                accumulate(name, x.detach().reshape(-1, x.shape[-1]).float())
        return pre_hook

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with preserved_modes(model), torch.no_grad():
            model.eval()
            for batch in batches:
                _call(model, batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in seen]
    if missing:
        raise AutopruneError(f"{method}: layers {', '.join(missing)} were never called on the calibration "
                             "batches, so their inputs are unknown; exclude them (space.exclude)")


class CalibrationImportance(Importance):
    """An importance scored from the calibration inputs of each unit's layer: :meth:`prepare` runs
    :func:`capture_inputs` and :meth:`accumulate` keeps running sums per layer (``self.stats``)."""

    needs_calibration = True

    def __init__(self) -> None:
        self.stats: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def prepare(self, model: nn.Module, units: Sequence[Unit], context: PruneContext) -> None:
        self.stats, self.tokens = {}, {}
        layers = {unit.name: model.get_submodule(unit.name) for unit in units}
        capture_inputs(model, layers, context.calibration_batches, self.name, self.accumulate)

    @abc.abstractmethod
    def accumulate(self, name: str, x: torch.Tensor) -> None:
        """Add the ``[tokens, in_features]`` float32 inputs ``x`` of layer ``name`` to ``self.stats``."""

    def _add(self, name: str, value: torch.Tensor, tokens: int) -> None:
        self.stats[name] = self.stats[name] + value if name in self.stats else value
        self.tokens[name] = self.tokens.get(name, 0) + tokens

    def release(self) -> None:
        self.stats, self.tokens = {}, {}


class OneShotMethod(PruningMethod):
    """An unstructured or N:M method on ``nn.Linear`` layers, scored from calibration inputs. Subclasses
    set ``self.importance`` (a :class:`CalibrationImportance`; an importance that needs no calibration for a
    data-free method, :mod:`.magnitude_nm`) and implement :meth:`prune_layer`."""

    family = "unstructured"
    importance: Importance

    def __init__(self, name: str, pattern: tuple[int, int] | None = None) -> None:
        self.name = name
        self.pattern = pattern

    @property
    def fixed_sparsity(self) -> float | None:
        """``1 - N/M`` for an N:M method (the only non-zero ratio it accepts), None when unstructured."""
        return None if self.pattern is None else 1.0 - self.pattern[0] / self.pattern[1]

    def _m(self) -> int | None:
        return self.pattern[1] if self.pattern else None

    def candidates(self, model: nn.Module, context: PruneContext) -> list[str]:
        return list(linear_layers(model, context.protected, self._m()))

    def prune(self, model: nn.Module, targets: Mapping[str, float], context: PruneContext) -> Removed:
        targets = live_targets(model, targets)
        layers = linear_layers(model, context.protected, self._m())
        chosen: dict[str, float] = {}
        for name, ratio in targets.items():
            if name not in layers:
                reason = _skip_reasons(model, context.protected, self._m()).get(name)
                raise unknown_unit(self.name, model, name, list(layers), reason)
            check_ratio(self.name, name, ratio, context)
            fixed = self.fixed_sparsity
            if fixed is not None and ratio != 0 and abs(ratio - fixed) > 1e-6:
                n, m = self.pattern  # type: ignore[misc]
                raise FixedSparsityError(
                    f"{self.name} keeps {n} of every {m} weights, so its sparsity is fixed: it expects ratio "
                    f"{fixed} (or 0) for {name!r} but was given {ratio}")
            if round(ratio * layers[name].weight.numel()) > 0:
                chosen[name] = ratio
        if not chosen:
            return {}
        units = [Unit.weights(name, layers[name]) for name in chosen]
        prepare(self.name, self.importance, model, units, context)
        try:
            with torch.no_grad():
                for unit in units:
                    self.prune_layer(unit, layers[unit.name], chosen[unit.name], context)
        finally:
            if isinstance(self.importance, CalibrationImportance):
                self.importance.release()
        if self.pattern is not None:
            record = dict(getattr(model, SEMI_STRUCTURED_ATTR, {}))
            record.update(dict.fromkeys(chosen, f"{self.pattern[0]}:{self.pattern[1]}"))
            setattr(model, SEMI_STRUCTURED_ATTR, record)
        return {}

    def prune_layer(self, unit: Unit, layer: nn.Linear, ratio: float, context: PruneContext) -> None:
        """Zero ``round(ratio * numel)`` weights of ``layer`` (or its N:M pattern) in place, under no_grad.

        By default the lowest scores of ``self.importance`` go: per output row (:func:`row_lowest`), or the
        ``M - N`` lowest of every M consecutive weights (:func:`nm_lowest`); weights already zero score lowest.
        A method that also updates the weights it keeps (SparseGPT) overrides this."""
        weight = layer.weight
        score = self.importance.scores(unit, context)
        score[weight.detach() == 0] = -float("inf")
        if self.pattern is None:
            drop = row_lowest(score, round(ratio * weight.numel()))
        else:
            drop = nm_lowest(score, *self.pattern)
        weight.mul_((~drop).to(weight.dtype))

    def replay(self, model: nn.Module, removed: Mapping[str, Sequence[int]], context: PruneContext) -> None:
        """Nothing to repeat: zeros change no shape (callers re-apply :func:`.unstructured.masks_of` masks)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def row_lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean ``[rows, cols]`` mask of ``count`` entries of ``score``, lowest per row: ``count // rows`` in
    every row, and the remaining ``count % rows`` as the next-lowest entries of the rows where they are lowest."""
    rows = score.shape[0]
    base, extra = divmod(count, rows)
    order = torch.argsort(score, dim=1, stable=True)
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, order[:, :base], True)
    if extra:
        nxt = order[:, base]
        pick = torch.argsort(score.gather(1, nxt[:, None]).squeeze(1), stable=True)[:extra]
        mask[pick, nxt[pick]] = True
    return mask


def nm_lowest(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask of the ``m - n`` lowest entries in every group of ``m`` consecutive columns of each row."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def semi_structured_layers(model: nn.Module) -> dict[str, str]:
    """``{layer name: "N:M"}`` for the layers an N:M method pruned (JSON-able; empty when none): what a
    trial logs and what :func:`to_semi_structured` converts."""
    return dict(getattr(model, SEMI_STRUCTURED_ATTR, {}))


def to_semi_structured(model: nn.Module) -> list[str]:
    """Replace the weight of every recorded 2:4 layer by ``torch.sparse.to_sparse_semi_structured`` (CUDA,
    fp16/bf16 only; 4:8 has no kernel and stays dense). Returns the converted layer names."""
    if not torch.cuda.is_available() or not hasattr(torch.sparse, "to_sparse_semi_structured"):
        raise AutopruneError("semi-structured (2:4) kernels need CUDA; on CPU the N:M zeros stay plain zeros")
    done = []
    for name, pattern in semi_structured_layers(model).items():
        layer = model.get_submodule(name)
        if pattern == "2:4" and layer.weight.is_cuda:
            layer.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(layer.weight.detach()))
            done.append(name)
    return done
