"""Getting the user's model and data: import ``module:callable`` factories,
load checkpoints safely, and train the dense model once per study (torch only)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .weights_format import remember_factory


def import_factory(spec: str, base_dir: Path, field: str) -> tuple[Callable[..., Any], ModuleType]:
    """Resolve ``'module:callable'``; ``module`` may live beside the config file.

    Returns the callable and its module (the module is shipped to Ray workers
    when it is not an installed package).
    """
    module_name, _, attr = spec.partition(":")
    base = str(base_dir)
    if base not in sys.path:
        sys.path.insert(0, base)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"field {field!r}: cannot import module {module_name!r} (looked in {base} and "
            f"installed packages): {type(exc).__name__}: {exc}"
        ) from None
    target = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"field {field!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(target):
        raise ConfigError(f"field {field!r}: expected a callable, got {type(target).__name__} for {spec!r}")
    return target, module


def build_model(factory: Callable[..., Any], kwargs: dict[str, Any], field: str) -> nn.Module:
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ConfigError(f"field {field!r}: calling the factory failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"field {field!r}: expected the factory to return a torch.nn.Module, "
                          f"got {type(model).__name__}")
    remember_factory(model, factory, kwargs)  # trial files are then rebuilt from it, with no pickled skeleton
    return model.eval()


Loader = Iterable[tuple[torch.Tensor, torch.Tensor]]


def build_loaders(factory: Callable[..., Any], kwargs: dict[str, Any],
                  field: str) -> tuple[Loader, Loader, Loader | None]:
    """Call the data factory and check it returns ``(train_loader, val_loader)`` or ``(train_loader,
    val_loader, test_loader)`` whose batches are ``(inputs, targets)`` tensors; the test loader is None
    when there is none."""
    try:
        loaders = factory(**kwargs)
    except Exception as exc:
        raise ConfigError(f"field {field!r}: calling the factory failed: {type(exc).__name__}: {exc}") from None
    if not (isinstance(loaders, tuple | list) and len(loaders) in (2, 3)):
        raise ConfigError(f"field {field!r}: expected the factory to return (train_loader, val_loader) or "
                          f"(train_loader, val_loader, test_loader), got {type(loaders).__name__}")
    return check_loaders(loaders, field)


def check_loaders(loaders: Sequence[Loader | None], field: str) -> tuple[Loader, Loader, Loader | None]:
    """Check that the train, validation (and test, if not None) loaders yield ``(inputs, targets)`` tensor
    batches; returns ``(train, val, test or None)``."""
    for which, loader in zip(("train", "val", "test"), loaders, strict=False):
        if loader is None and which == "test":
            continue
        batch = next(iter(loader), None)
        ok = (isinstance(batch, tuple | list) and len(batch) == 2
              and all(isinstance(t, torch.Tensor) for t in batch))
        if not ok:
            raise ConfigError(f"field {field!r}: expected {which} batches of (inputs, targets) tensors, "
                              f"got {type(batch).__name__}")
    return loaders[0], loaders[1], (loaders[2] if len(loaders) > 2 else None)




def load_checkpoint(model: nn.Module, path: Path, field: str = "model.checkpoint") -> None:
    """Load a state_dict with ``weights_only=True``; mismatches name the keys."""
    if path.is_dir():
        raise ConfigError(f"field {field!r}: expected a checkpoint file, got {path}, which is a directory")
    if not path.is_file():
        raise ConfigError(f"field {field!r}: checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"field {field!r}: cannot read {path} as a weights-only state_dict: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"field {field!r}: expected a state_dict in {path}, got {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:4]
        raise ConfigError(f"field {field!r}: checkpoint {path} does not match the model: "
                          + " ".join(lines)) from None
