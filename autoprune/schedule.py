"""Pruning schedules (one-shot or iterative) and lottery-ticket rewinding, for one trial (torch only).

One-shot
    Prune every unit to its planned sparsity at once, then fine-tune for ``finetune.epochs``.

Iterative (``rounds = k``)
    ``k`` prune / fine-tune rounds. After round ``t`` each unit has reached the cubic AGP
    sparsity (Zhu & Gupta, 2017) ``s_t = s * (1 - (1 - t/k)**3)``, so ``s_k = s``; most of it
    goes early, when the network can still recover, little at the end.

    * Unstructured units get the absolute ratio ``s_t`` each round: the methods rank weights
      that are already zero lowest, so the zeros of earlier rounds are kept and ``round(s_t * n)``
      zeros are reached (``n``: the layer's weights at that time).
    * Structured units (channels, heads, neurons) shrink the model, and a method's ratio is
      relative to the *current* size. The schedule works in whole units: ``n_t`` =
      the count one-shot would remove for ``s_t`` of the original ``C`` (same rounding, same
      ``round_to``, at least one kept), and round ``t`` asks for ``(n_t - n_{t-1}) / (C - n_{t-1})``
      of what is left, which the method turns back into exactly ``n_t - n_{t-1}`` (this is
      ``r_rel = 1 - (1 - r_t) / (1 - r_{t-1})`` in integer form, with no rounding drift). The
      final count therefore equals one-shot's exactly.
    * Block removal (all or nothing) happens in the first round.
    * Caps: each unit's *final* sparsity is checked against ``max_layer_sparsity`` up front, as
      one-shot does; the per-round relative ratios of structured units are not capped again.

    Fine-tuning budget: iterative pruning gets the *same* number of optimizer steps as one-shot,
    ``finetune.epochs x`` batches per epoch (``finetune.max_batches`` applied), split evenly over
    the rounds (the remainder to the last rounds), so the search compares schedules at equal
    training cost. A round's steps run through the data loader in order, wrapping around; the
    optimizer starts afresh each round (the model changed shape or lost weights). With
    ``finetune.epochs: 0`` no round fine-tunes.

    After the last round the reached sparsity is checked (:meth:`Schedule.check`): a unit that
    ends below its plan raises instead of being reported as pruned.

Rewinding (lottery-ticket style, Frankle et al. 2019 / Renda et al. 2020)
    After each pruning step has decided *which* weights, channels, heads or blocks survive (from
    the trained weights), every parameter and buffer of the pruned model is reset to its value at
    the rewind point (the dense model after ``space.rewind_epoch`` epochs of pre-training, or a
    given checkpoint), unstructured zeros are re-applied, and fine-tuning starts from there with
    the masks held. For structured units the early model undergoes the very same surgery with the
    recorded indices (:func:`rewind`, through each method's ``replay``): Torch-Pruning's dependency
    graph for channel groups, the attention methods' own slicing of the recorded heads / neurons,
    the same block removal; the result must match the pruned model's parameter names and shapes or
    the trial fails. Rewinding means re-training from early weights: it needs the fine-tuning
    epochs to do so.

Only the method contract (:class:`~autoprune.methods.PruningMethod`: ``family``, ``indexed``,
``prune``, ``unit_size``, ``removal_count``, ``replay``) is used here, never a method's class or
internals, so a new method that fills the contract works with every schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import AutopruneError
from .methods import FAMILY_ORDER, PruneContext, check_ratio, get_method, live_targets, removed_blocks
from .methods.unstructured import apply_masks
from .plan import Plan
from .training import TrainSettings, train

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Targets = dict[str, dict[str, float]]
"""Pruning targets of one step: method name -> {unit: ratio}."""
Removed = dict[str, dict[str, list[int]]]
"""What the methods reported removed in one step: method name -> {unit: indices} (see ``PruningMethod.prune``)."""

# Relative per-round ratios of structured units may exceed the cap (the final sparsity is checked
# against it up front); methods still refuse 1.0.
_ROUND_CAP = 1.0 - 1e-9


def agp_sparsity(final: float, step: int, rounds: int) -> float:
    """Cubic AGP sparsity after ``step`` of ``rounds`` rounds: ``final * (1 - (1 - step/rounds)**3)``."""
    if rounds < 1 or not 0 <= step <= rounds:
        raise ValueError(f"step must be in [0, rounds] and rounds >= 1, got step={step}, rounds={rounds}")
    return final * (1.0 - (1.0 - step / rounds) ** 3)


def agp_schedule(final: float, rounds: int) -> list[float]:
    """The sparsities reached after rounds ``1..rounds`` (the last one is ``final``)."""
    return [final if t == rounds else agp_sparsity(final, t, rounds) for t in range(1, rounds + 1)]


def relative_ratio(previous: float, current: float) -> float:
    """The fraction of what is left after ``previous`` to remove to reach ``current``: ``1 - (1-r_t)/(1-r_{t-1})``."""
    return 1.0 - (1.0 - current) / (1.0 - previous)


def supports_iterative(method_name: str) -> bool:
    """Whether :class:`Schedule` can spread ``method_name`` over several rounds (and rewind it):
    structured methods must be ``indexed`` (count, report and replay whole parts), and a method with one
    fixed sparsity (N:M) has no intermediate rounds."""
    method = get_method(method_name)
    if getattr(method, "fixed_sparsity", None) is not None:
        return False
    return method.family != "structured" or method.indexed


# --------------------------------------------------------------------------- the schedule


@dataclass
class _Item:
    layer: str
    method: str
    family: str
    final: float
    size: int | None = None  # structured: original parts (channels, heads, neurons); else None
    removed: int = 0


class Schedule:
    """The per-round pruning targets of one plan, and the check that the plan was reached."""

    def __init__(self, model: nn.Module, plan: Plan, context: PruneContext) -> None:
        self.rounds = plan.rounds
        self.context = context
        self._methods = {item.method: get_method(item.method) for item in plan.layers}
        self.items: list[_Item] = []
        for item in plan.layers:
            method = self._methods[item.method]
            entry = _Item(item.layer, item.method, method.family, item.sparsity)
            if method.family in ("structured", "unstructured"):
                check_ratio(item.method, item.layer, item.sparsity, context)
            if method.family == "structured":
                if method.indexed:
                    entry.size = method.unit_size(model, item.layer)
                elif self.rounds > 1:
                    raise AutopruneError(f"schedule: structured method {item.method!r} is not supported by iterative "
                                         "schedules; use the one-shot schedule for it")
            self.items.append(entry)

    def step_context(self, step: int) -> PruneContext:
        """The context for round ``step``: one-shot keeps the configured cap (the methods check it)."""
        return self.context if self.rounds == 1 else replace(self.context, max_layer_sparsity=_ROUND_CAP)

    def targets(self, step: int) -> Targets:
        """What to prune in round ``step`` (1-based), by method."""
        if not 1 <= step <= self.rounds:
            raise ValueError(f"step must be in 1..{self.rounds}, got {step}")
        targets: Targets = {}
        for item in self.items:
            ratio: float | None
            if item.family == "removal":
                ratio = item.final if step == 1 else None
            elif self.rounds == 1:
                ratio = item.final
            elif item.family == "unstructured" or item.size is None:  # (None: not a unit; the method says why)
                ratio = agp_sparsity(item.final, step, self.rounds) if step < self.rounds else item.final
            else:
                method = self._methods[item.method]
                wanted = method.removal_count(item.size, agp_schedule(item.final, self.rounds)[step - 1],
                                              self.context)
                left = item.size - item.removed
                ratio = (wanted - item.removed) / left if wanted > item.removed else None
            if ratio is not None:
                targets.setdefault(item.method, {})[item.layer] = ratio
        return targets

    def record(self, removed: Removed) -> None:
        """Count what structured methods removed in a round (from :func:`prune_step`)."""
        for item in self.items:
            if item.size is not None:
                item.removed += len(removed.get(item.method, {}).get(item.layer, []))

    def check(self, model: nn.Module) -> None:
        """Raise unless every unit reached its planned sparsity (units inside removed blocks excepted)."""
        gone = set(removed_blocks(model))
        problems = []
        for item in self.items:
            if item.family == "removal":
                if item.final >= 0.5 and item.layer not in gone:
                    problems.append(f"block {item.layer!r} was not removed")
                continue
            if item.layer not in live_targets(model, {item.layer: item.final}):
                continue  # inside a removed block: gone entirely
            if item.family == "unstructured":
                weight = model.get_submodule(item.layer).weight
                wanted = round(item.final * weight.numel())
                zeros = int((weight.detach() == 0).sum())
                if zeros < wanted:
                    problems.append(f"{item.method} {item.layer!r}: {zeros} zero weights, planned {wanted}")
            elif item.size is not None:
                wanted = self._methods[item.method].removal_count(item.size, item.final, self.context)
                if item.removed != wanted:
                    problems.append(f"{item.method} {item.layer!r}: removed {item.removed} of {item.size}, "
                                    f"planned {wanted}")
        if problems:
            raise AutopruneError("the pruned model does not reach its plan: " + "; ".join(problems))


def prune_step(model: nn.Module, targets: Targets, context: PruneContext) -> Removed:
    """Prune ``model`` in place, family by family (removal, structured, unstructured).

    Returns what each method reported removed (indices numbered as before this step).
    """
    methods = {name: get_method(name) for name in targets}
    removed: Removed = {}
    for family in FAMILY_ORDER:
        for name, unit_targets in targets.items():
            method = methods[name]
            if method.family == family:
                removed[name] = dict(method.prune(model, unit_targets, context) or {})
    return removed


# --------------------------------------------------------------------------- fine-tuning budget


def batches_per_epoch(loader: Batches, settings: TrainSettings) -> int:
    """Optimizer steps in one fine-tuning epoch: ``len(loader)`` (counted once if it has no len),
    capped by ``settings.max_batches``."""
    try:
        count = len(loader)  # type: ignore[arg-type]
    except TypeError:
        count = sum(1 for _ in loader)
    return count if settings.max_batches is None else min(count, settings.max_batches)


def split_steps(total: int, rounds: int) -> list[int]:
    """``total`` steps over ``rounds`` rounds as evenly as possible, the remainder to the last rounds."""
    base, extra = divmod(total, rounds)
    return [base + (1 if t >= rounds - extra else 0) for t in range(rounds)]


class _Steps:
    """``steps`` batches of ``loader``, wrapping around; each pass stops after ``per_pass`` batches."""

    def __init__(self, loader: Batches, steps: int, per_pass: int | None) -> None:
        self.loader, self.steps, self.per_pass = loader, steps, per_pass

    def __len__(self) -> int:
        return self.steps  # what a learning-rate schedule spans (an empty loader yields fewer)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        done = 0
        while done < self.steps:
            before = done
            for index, batch in enumerate(self.loader):
                if (self.per_pass is not None and index >= self.per_pass) or done >= self.steps:
                    break
                yield batch
                done += 1
            if done == before:
                return  # an empty loader


def finetune(
    model: nn.Module,
    loader: Batches,
    settings: TrainSettings,
    steps: int | None,
    masks: Mapping[str, torch.Tensor] | None,
    teacher: nn.Module | None = None,
) -> None:
    """Fine-tune with unstructured ``masks`` held; ``steps=None`` means ``settings.epochs`` epochs (one-shot);
    ``teacher`` (the dense model) for distillation when ``settings.distill_weight > 0``."""
    after_step = (lambda m: apply_masks(m, masks)) if masks else None
    if steps is None:
        train(model, loader, settings, after_step=after_step, teacher=teacher)
    elif steps > 0:
        train(model, _Steps(loader, steps, settings.max_batches), replace(settings, epochs=1, max_batches=None),
              after_step=after_step, teacher=teacher)


def round_steps(loader: Batches, settings: TrainSettings, rounds: int) -> list[int | None]:
    """Fine-tuning per round: ``[None]`` (plain epochs) for one round, else the split step budget."""
    if rounds == 1:
        return [None]
    total = settings.epochs * batches_per_epoch(loader, settings) if settings.epochs else 0
    return list(split_steps(total, rounds))


# --------------------------------------------------------------------------- rewinding


def replay(early: nn.Module, targets: Targets, removed: Removed, context: PruneContext) -> None:
    """Apply to ``early`` the structural changes a :func:`prune_step` made (same blocks, same indices)."""
    methods = {name: get_method(name) for name in targets}
    for family in ("removal", "structured"):
        for name in targets:
            if methods[name].family == family:
                methods[name].replay(early, removed.get(name, {}), context)


def rewind(
    model: nn.Module,
    early: nn.Module,
    targets: Targets,
    removed: Removed,
    context: PruneContext,
    masks: Mapping[str, torch.Tensor] | None,
) -> None:
    """Reset ``model``'s surviving weights to their early values after a pruning step.

    ``early`` (the early model in ``model``'s shape before this step) gets the same structural
    changes, then its parameters and buffers are loaded into ``model`` and the unstructured
    ``masks`` re-applied. ``early`` is changed in place and stays aligned for the next round.
    """
    replay(early, targets, removed, context)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in early.state_dict().items()}
    if mine != theirs:
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise AutopruneError(f"rewinding: the early weights could not be mapped through the pruning surgery "
                             f"(mismatch in {', '.join(diff[:6])})")
    model.load_state_dict(early.state_dict())
    if masks:
        apply_masks(model, masks)


def early_model(dense: nn.Module, state: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """A copy of ``dense`` holding the rewind-point weights ``state``."""
    if state is None:
        raise AutopruneError("the plan asks for rewinding but the trial has no early weights (TrialSettings."
                             "rewind_state); set space.rewind and pre-train, or give space.rewind_checkpoint")
    early = copy.deepcopy(dense)
    try:
        early.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise AutopruneError(f"rewinding: the early weights do not fit the dense model: {exc}") from None
    return early

