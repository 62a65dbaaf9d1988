"""The schedule relies on the method contract alone: no private imports from
``autoprune.methods`` and no ``isinstance`` on its classes (checked on the AST of
``autoprune/schedule.py``), so a method built from the contract's parts (here a
new importance plugged into existing method classes) runs iterative schedules
and rewinding with no change to the schedule."""

from __future__ import annotations

import ast
import inspect
import types
from pathlib import Path

import pytest
import torch
from zoo import ZOO

from autoprune import schedule
from autoprune.methods import Importance, PruneContext, Unit, get_method, registry
from autoprune.methods.attention import AttentionHeads
from autoprune.methods.structured import StructuredMethod
from autoprune.plan import LayerPlan, Plan
from autoprune.training import TrainSettings
from autoprune.trial import TrialSettings, prune_and_finetune


def _resolve_import(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _classes(value: object) -> list[type]:
    if isinstance(value, tuple):
        return [c for item in value for c in _classes(item)]
    if isinstance(value, types.UnionType):
        return [c for item in value.__args__ for c in _classes(item)]
    return [value] if inspect.isclass(value) else []


def contract_violations(source: str, namespace: dict[str, object], package: str = "autoprune") -> list[str]:
    """Private imports from ``autoprune.methods`` and ``isinstance`` / ``issubclass`` checks
    against classes defined there, in ``source`` (names resolved in ``namespace``)."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = _resolve_import(node, package)
            if module == "autoprune.methods" or module.startswith("autoprune.methods."):
                if any(part.startswith("_") for part in module.split(".")):
                    problems.append(f"line {node.lineno}: imports from private module {module}")
                problems += [
                    f"line {node.lineno}: imports private name {alias.name} from {module}"
                    for alias in node.names
                    if alias.name.startswith("_")
                ]
        elif isinstance(node, ast.Import):
            problems += [
                f"line {node.lineno}: imports private module {alias.name}"
                for alias in node.names
                if alias.name.startswith("autoprune.methods") and "._" in alias.name
            ]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            try:
                value = eval(compile(ast.Expression(node.value), "<attribute>", "eval"), dict(namespace))
            except NameError:
                continue
            if isinstance(value, types.ModuleType) and value.__name__.startswith("autoprune.methods"):
                problems.append(f"line {node.lineno}: uses private name {value.__name__}.{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("isinstance", "issubclass")
            and len(node.args) == 2
        ):
            try:
                value = eval(compile(ast.Expression(node.args[1]), "<isinstance>", "eval"), dict(namespace))
            except NameError:
                continue  # a local variable: not a class imported at module level
            for cls in _classes(value):
                if cls.__module__.startswith("autoprune.methods"):
                    problems.append(f"line {node.lineno}: {node.func.id}(..., {cls.__name__}) on a methods class")
    return problems


def test_schedule_uses_only_the_method_contract() -> None:
    source = Path(schedule.__file__).read_text()
    assert contract_violations(source, vars(schedule)) == []


def test_the_contract_check_catches_violations() -> None:
    bad = """
from .methods._common import live_targets
from .methods.structured import _forward
from .methods.attention import AttentionHeads, MLPNeurons
import autoprune.methods._common
def f(method, module):
    attention.scan_attention(module) and attention._lowest(module, 1)
    return isinstance(method, AttentionHeads | MLPNeurons) or isinstance(module, (int, AttentionHeads))
"""
    from autoprune.methods import attention
    from autoprune.methods.attention import MLPNeurons

    namespace = {"AttentionHeads": AttentionHeads, "MLPNeurons": MLPNeurons, "attention": attention}
    found = contract_violations(bad, namespace)
    assert len(found) == 7, found
    assert contract_violations("def f(x):\n    return isinstance(x, int)\n", {}) == []


class _Rank(Importance):
    """A made-up criterion: the index of the part (the first parts go first)."""

    name = "rank"

    def scores(self, unit: Unit, context: PruneContext) -> torch.Tensor:
        if unit.group is not None:
            return torch.arange(len(unit.group[0][1]), dtype=torch.float32)
        return torch.arange(unit.count, dtype=torch.float32)


def _rank_structured() -> StructuredMethod:
    return StructuredMethod("rank_structured", _Rank())


class _RankHeads(AttentionHeads):
    name = "rank_heads"

    def __init__(self) -> None:
        super().__init__(_Rank())


@pytest.mark.parametrize(("arch", "method", "unit", "size"), [
    ("mlp", "rank_structured", "body.0", 32),
    ("transformer", "rank_heads", "encoder.layers.0.self_attn", 4),
])
def test_a_new_importance_runs_iterative_schedules_and_rewinding(monkeypatch, arch, method, unit, size) -> None:
    monkeypatch.setitem(registry._REGISTRY, "rank_structured", _rank_structured)
    monkeypatch.setitem(registry._REGISTRY, "rank_heads", _RankHeads)
    assert schedule.supports_iterative(method)
    entry = ZOO[arch]
    dense = entry.build()
    context = PruneContext(example_inputs=entry.example(2), protected=frozenset({entry.head}))
    assert get_method(method).unit_size(dense, unit) == size
    early = {k: 2 * v for k, v in dense.state_dict().items()}
    settings = TrialSettings(finetune=TrainSettings(epochs=0), protected=context.protected, rewind_state=early)
    layers = (LayerPlan(unit, method, 0.5),)
    pruned, _ = prune_and_finetune(dense, [], Plan(layers, schedule="iterative", rounds=2), settings, context)
    rewound, _ = prune_and_finetune(dense, [], Plan(layers, schedule="iterative", rounds=2, rewind=True),
                                    settings, context)
    assert get_method(method).unit_size(pruned, unit) == size // 2
    kept, back = pruned.state_dict(), rewound.state_dict()
    assert kept.keys() == back.keys()
    assert [k for k in kept if not torch.equal(back[k], 2 * kept[k])] == []
    # the lowest-ranked parts went: the kept ones are the last half, in order
    d = dense.get_submodule(unit)
    if method == "rank_structured":
        torch.testing.assert_close(pruned.get_submodule(unit).weight, d.weight[size // 2 :])
