"""Fast start: the CLI and config validation import neither torch nor MLflow (each costs seconds), and the
torch-free method catalogue config validation uses agrees with the registry. Timings: benchmarks/startup.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlflow", "ray", "torch_pruning")


def _loaded_after(code: str) -> dict[str, bool]:
    """Which heavy modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_import_is_light() -> None:
    assert _loaded_after("import autoprune.cli") == dict.fromkeys(HEAVY, False)


def test_help_is_light() -> None:
    loaded = _loaded_after("import sys\nfrom autoprune.cli import main\nsys.argv = ['autoprune', 'run', '--help']\n"
                           "try:\n    main()\nexcept SystemExit:\n    pass")
    assert loaded == dict.fromkeys(HEAVY, False)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "search_spaces").glob("*.yaml")))
def test_load_config_is_light(config: str) -> None:
    loaded = _loaded_after(f"from autoprune.config import load_config\nload_config('search_spaces/{config}')")
    assert loaded == dict.fromkeys(HEAVY, False)


def test_iterative_config_is_light() -> None:
    """The schedule and rewind checks of config validation (they used to import autoprune.schedule)."""
    loaded = _loaded_after("from autoprune.config import load_config\n"
                           "load_config('search_spaces/digits_cnn.yaml', ['space.schedules=[oneshot, iterative]', "
                           "'space.rewind=search'])")
    assert loaded == dict.fromkeys(HEAVY, False)


def test_catalog_matches_the_registry() -> None:
    from autoprune import catalog
    from autoprune.methods import get_method, known_methods
    from autoprune.schedule import supports_iterative

    assert sorted(catalog.FAMILIES) == known_methods()
    for name in known_methods():
        assert catalog.FAMILIES[name] == get_method(name).family, name
        assert catalog.supports_iterative(name) == supports_iterative(name), name
