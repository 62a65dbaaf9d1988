"""Shared fixtures: a tiny config beside a tiny model/data module, written per test."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from autoprune.plan import Plan
from autoprune.training import TrainSettings
from autoprune.trial import DenseBaseline, TrialOutput, TrialSettings, measure_dense, run_trial

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]

TINY_MODULE = '''
"""A tiny model and data for tests: a 2-conv CNN on digits."""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits


class Tiny(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def make_model(width=16):
    return Tiny(width)


def not_a_model():
    return 42


def make_loaders(n=400, batch_size=50):
    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target[:n])
    cut = int(0.75 * n)
    return (DataLoader(TensorDataset(x[:cut], y[:cut]), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(TensorDataset(x[cut:], y[cut:]), batch_size=100))
'''

TINY_CONFIG = """
study: {name: tiny, n_trials: 4, sampler: random, seed: 0, baselines: []}
work_dir: work
model:
  factory: "tinymod:make_model"
  pretrain: {epochs: 6, lr: 0.01}
data:
  factory: "tinymod:make_loaders"
space:
  methods: [l1_unstructured, l1_structured]
  sparsity: {low: 0.1, high: 0.8}
finetune: {epochs: 1}
latency: {rounds: 2, min_run_time: 0.01}
execution: {parallel: 2, cpus_per_trial: 1}
"""


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads made training several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A directory with ``tinymod.py`` and ``search.yaml``; returns the config path."""
    (tmp_path / "tinymod.py").write_text(TINY_MODULE)
    config = tmp_path / "search.yaml"
    config.write_text(textwrap.dedent(TINY_CONFIG))
    return config


@pytest.fixture
def tiny(tiny_project: Path) -> Iterator[ModuleType]:
    """The ``tinymod`` module of :func:`tiny_project`, imported (and forgotten afterwards)."""
    sys.path.insert(0, str(tiny_project.parent))
    module = importlib.import_module("tinymod")
    yield module
    sys.path.remove(str(tiny_project.parent))
    sys.modules.pop("tinymod", None)


@dataclass
class TrialSetup:
    """A seeded tiny dense model, its data, cheap trial settings and its measured baseline."""

    dense: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    settings: TrialSettings
    baseline: DenseBaseline

    def run(self, plan: Plan) -> TrialOutput:
        return run_trial(self.dense, self.train_loader, self.val_loader, plan, self.settings, self.baseline)


@pytest.fixture
def tiny_setup(tiny: ModuleType) -> Callable[..., TrialSetup]:
    """``tiny_setup(epochs=1)``: a :class:`TrialSetup` on the tiny CNN, fine-tuning ``epochs`` per trial."""

    def make(epochs: int = 1) -> TrialSetup:
        torch.manual_seed(0)
        dense = tiny.make_model()
        train_loader, val_loader = tiny.make_loaders()
        settings = TrialSettings(finetune=TrainSettings(epochs=epochs), protected=frozenset({"fc"}),
                                 latency_rounds=1, latency_min_run_time=0.01)
        baseline = measure_dense(dense, val_loader, settings, min_run_time=0.02)
        return TrialSetup(dense, train_loader, val_loader, settings, baseline)

    return make


def run_tiny_search(root: Path, overrides: list[str]):
    """A finished 2-trial in-process study of the tiny project written into ``root`` (for module fixtures):
    ``(config_path, overrides, config, summary)``; the caller forgets ``tinymod`` afterwards."""
    from autoprune.config import load_config
    from autoprune.search import run_search

    (root / "tinymod.py").write_text(TINY_MODULE)
    config_path = root / "search.yaml"
    config_path.write_text(textwrap.dedent(TINY_CONFIG))
    overrides = ["execution.backend=in_process", "study.n_trials=2", "model.pretrain.epochs=1", *overrides]
    config = load_config(config_path, overrides)
    summary = run_search(config)
    assert summary.completed == 2
    return config_path, overrides, config, summary
