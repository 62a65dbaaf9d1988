"""The package's shape: dependencies point one way (no import cycle, function-level imports included),
the trial core knows only torch, and the glue modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autoprune"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package imported by ``name`` anywhere in its code, except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m not in ("autoprune", name)}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", ["autoprune.trial", "autoprune.measure", "autoprune.methods", "autoprune.plan",
                                  "autoprune.model_files", "autoprune.schedule"])
def test_trial_core_imports_neither_optuna_ray_nor_mlflow(name: str) -> None:
    """What runs on a worker is torch only (the whole import closure inside the package)."""
    graph, modules = _graph(), _modules()
    closure, todo = set(), [m for m in modules if m == name or m.startswith(name + ".")]
    while todo:
        current = todo.pop()
        if current not in closure:
            closure.add(current)
            todo.extend(graph[current])
    for module in closure:
        tree = ast.parse(modules[module].read_text())
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and node.lineno not in skip:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                heavy = [n for n in names if n.split(".")[0] in ("optuna", "ray", "mlflow")]
                assert not heavy, f"{module} (imported by {name}) imports {heavy}"


@pytest.mark.parametrize("name", ["study.py", "search.py", "storage.py", "drivers.py", "loop.py", "workspace.py",
                                  *sorted(f"cli/{p.name}" for p in (PACKAGE / "cli").glob("*.py"))])
def test_glue_modules_stay_small(name: str) -> None:
    lines = len((PACKAGE / name).read_text().splitlines())
    assert lines < 350, f"autoprune/{name} has {lines} lines; split it by concern"
