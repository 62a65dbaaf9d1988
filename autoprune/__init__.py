"""autoprune: automated multi-objective pruning search for PyTorch models.

The public API (``Search``, ``load_search``, ``TrialRecord``) is imported on first use, so that
``import autoprune`` and ``autoprune --help`` stay fast (no torch, no MLflow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Search", "TrialRecord", "__version__", "load_search"]

if TYPE_CHECKING:
    from .api import Search, TrialRecord, load_search


def __getattr__(name: str) -> Any:
    if name in ("Search", "TrialRecord", "load_search"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
