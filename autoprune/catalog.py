"""The pruning methods by name, without importing them: what config validation needs.

:mod:`autoprune.methods` imports torch and Torch-Pruning (seconds); checking a config's
``space.methods`` must not. This table names every built-in method with its family and
whether the iterative schedule and rewinding can spread it over rounds
(:func:`autoprune.schedule.supports_iterative`); ``tests/test_startup.py`` checks it against
the registry, so a new method is added here too. Methods registered at run time (a user's
own, through :func:`autoprune.methods.register`) are found in the registry when
:mod:`autoprune.methods` is already imported.
"""

from __future__ import annotations

import sys

from .errors import ConfigError

#: Built-in method name -> family (``removal``, ``structured`` or ``unstructured``).
FAMILIES: dict[str, str] = {
    "remove_block": "removal",
    "l1_structured": "structured",
    "l2_structured": "structured",
    "taylor_structured": "structured",
    "bn_scale_structured": "structured",
    "random_structured": "structured",
    "attention_heads": "structured",
    "mlp_neurons": "structured",
    "l1_unstructured": "unstructured",
    "l2_unstructured": "unstructured",
    "taylor_unstructured": "unstructured",
    "random_unstructured": "unstructured",
    "wanda": "unstructured",
    "magnitude_2:4": "unstructured",
    "magnitude_4:8": "unstructured",
    "wanda_2:4": "unstructured",
    "wanda_4:8": "unstructured",
    "sparsegpt": "unstructured",
    "sparsegpt_2:4": "unstructured",
    "sparsegpt_4:8": "unstructured",
}

#: Built-in methods the iterative schedule and rewinding support: all but the N:M ones, whose one sparsity
#: (N/M zeros) cannot be reached in steps.
ITERATIVE: frozenset[str] = frozenset(FAMILIES) - {"magnitude_2:4", "magnitude_4:8", "wanda_2:4", "wanda_4:8",
                                                  "sparsegpt_2:4", "sparsegpt_4:8"}


def _registry() -> dict[str, object]:
    """The live registry, only if :mod:`autoprune.methods` is imported already (never imports torch)."""
    if "autoprune.methods.registry" not in sys.modules:
        return {}
    return dict(sys.modules["autoprune.methods.registry"]._REGISTRY)


def known_methods() -> list[str]:
    """Every method name a config may use, sorted."""
    return sorted(set(FAMILIES) | set(_registry()))


def check_method(name: str) -> None:
    """Raise :class:`ConfigError` listing the known names when ``name`` is no pruning method."""
    if name not in FAMILIES and name not in _registry():
        raise ConfigError(f"unknown pruning method {name!r}; known methods: {', '.join(known_methods())}")


def supports_iterative(name: str) -> bool:
    """Whether the iterative schedule (and rewinding) can be used with method ``name``."""
    if name in FAMILIES:
        return name in ITERATIVE
    from .schedule import supports_iterative as registered  # a method registered at run time: torch is loaded

    return registered(name)
