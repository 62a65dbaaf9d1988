"""The model and data a search was given as Python objects, rather than as the config's factories."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Live:
    """Model and data given as Python objects (``autoprune.Search(model=..., train_data=...)``) instead of
    the config's factories. Data may be DataLoaders (or any iterable of ``(inputs, targets)`` batches with
    ``len``) or map-style datasets, batched with ``data.batch_size``."""

    model: nn.Module | None = None
    train_data: Any = None
    val_data: Any = None
    test_data: Any = None
    """Optional held-out data: each trial's ``test_accuracy`` is measured on it (never selected on)."""

    def __post_init__(self) -> None:
        if self.model is not None:
            from torch import nn

            if not isinstance(self.model, nn.Module):
                raise ConfigError(f"argument 'model': expected a torch.nn.Module, got {type(self.model).__name__}")
        if (self.train_data is None) != (self.val_data is None):
            raise ConfigError("arguments 'train_data' and 'val_data': expected both or neither, got one")
