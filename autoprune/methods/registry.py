"""Pruning methods by name.

Adding a method is one module defining a :class:`~.base.PruningMethod` subclass
decorated with :func:`register`, plus its import in ``methods/__init__.py``.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import PruningMethod

_REGISTRY: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pruning method name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def known_methods() -> list[str]:
    """All registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> PruningMethod:
    """A fresh instance of the method called ``name``.

    Raises :class:`ConfigError` listing the known names when ``name`` is unknown.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown pruning method {name!r}; known methods: {', '.join(known_methods())}"
        ) from None
    return cls()
