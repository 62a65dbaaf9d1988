"""Pruning methods: one small module per family, registered by name.

The contract is :class:`PruningMethod` (:mod:`.base`); how parts of a unit are
ranked is a pluggable :class:`Importance` (:mod:`.importance`). Callers outside
this package (the schedule, the trial) use only the names exported here and the
public functions of the family modules.
"""

from . import (  # noqa: F401  (registration side effect)
    attention,
    magnitude_nm,
    removal,
    sparsegpt,
    structured,
    unstructured,
    wanda,
)
from ._common import RemovedBlock, live_targets, removed_blocks
from .base import FAMILY_ORDER, PruneContext, PruningMethod, Removed, check_ratio, count_to_remove
from .importance import Importance, Unit, get_importance, known_importances, register_importance
from .registry import get_method, known_methods, register, register_method

__all__ = [
    "FAMILY_ORDER",
    "Importance",
    "PruneContext",
    "PruningMethod",
    "Removed",
    "RemovedBlock",
    "Unit",
    "check_ratio",
    "count_to_remove",
    "get_importance",
    "get_method",
    "known_importances",
    "known_methods",
    "live_targets",
    "register",
    "register_importance",
    "register_method",
    "removed_blocks",
]
