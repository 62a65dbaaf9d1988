"""Pruning methods by name.

Adding a method is one module defining a :class:`~.base.PruningMethod` subclass
decorated with :func:`register` (or one :func:`register_method` line giving a
factory, e.g. an existing method class with another importance), plus its import
in ``methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from .base import PruningMethod

_REGISTRY: dict[str, Callable[[], PruningMethod]] = {}


def register_method(name: str, factory: Callable[[], PruningMethod]) -> None:
    """Make ``factory()`` (a method whose ``name`` is ``name``) available under ``name``."""
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"pruning method name {name!r} is registered twice")
    _REGISTRY[name] = factory


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls()`` available under ``cls.name``."""
    register_method(cls.name, cls)
    return cls


def known_methods() -> list[str]:
    """All registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> PruningMethod:
    """A fresh instance of the method called ``name``.

    Raises :class:`ConfigError` listing the known names when ``name`` is unknown.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown pruning method {name!r}; known methods: {', '.join(known_methods())}"
        ) from None
    method = factory()
    if method.name != name:
        raise ValueError(f"pruning method registered as {name!r} calls itself {method.name!r}")
    return method
