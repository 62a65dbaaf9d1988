"""Pruning methods: one small module per family, registered by name."""

from . import attention, removal, structured, unstructured  # noqa: F401  (registration side effect)
from .base import FAMILY_ORDER, PruneContext, PruningMethod
from .registry import get_method, known_methods, register

__all__ = ["FAMILY_ORDER", "PruneContext", "PruningMethod", "get_method", "known_methods", "register"]
