"""A pruning search from Python, on a model defined right here (as in a notebook).

Run it: ``python examples/notebook_search.py`` (about a minute on 2 cores). It trains a small CNN on
scikit-learn's bundled digits, searches per-layer sparsities and methods for it with autoprune (Optuna
trials on a local Ray, results in MLflow under ./runs/notebook), prints the Pareto front, scores the
front's smallest model on held-out test digits the search never saw, and loads it back as a module.
No module file, no YAML: the model and the data are Python objects.
"""

from __future__ import annotations

import os
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune


class SmallCNN(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


def digits_splits() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Train / validation (the search selects on it) / test (only for the final report)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return (TensorDataset(x[:1200], y[:1200]), TensorDataset(x[1200:1500], y[1200:1500]),
            TensorDataset(x[1500:], y[1500:]))


def train(model: nn.Module, data: TensorDataset, epochs: int = 8) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def main(work_dir: str = "runs/notebook", n_trials: int = 6, backend: str = "ray") -> autoprune.Search:
    train_set, val_set, test_set = digits_splits()
    model = train(SmallCNN(), train_set)

    search = autoprune.Search(
        {
            "study": {"name": "notebook", "n_trials": n_trials, "sampler": "random", "baselines": [0.5]},
            "work_dir": work_dir,
            "space": {"methods": ["l1_structured", "l1_unstructured"], "sparsity": {"low": 0.1, "high": 0.8}},
            "finetune": {"epochs": 1},
            "execution": {"backend": backend, "parallel": 2},
            "data": {"batch_size": 64},
        },
        model=model, train_data=train_set, val_data=val_set, test_data=test_set,
    )
    summary = search.run(progress=lambda p: p.message and print(" ", p.message))
    print(f"{summary.completed} complete, {summary.failed} failed")

    front = search.front()
    for record in front:
        print(f"trial {record.trial}: accuracy {record.accuracy:.4f}, {record.size_bytes:,} bytes, "
              f"{record.latency_ms:.3f} ms")
    smallest = front[0]
    pruned = search.load_model(smallest.trial)
    print(f"smallest front model: trial {smallest.trial}, {sum(p.numel() for p in pruned.parameters()):,} "
          f"parameters; validation accuracy {smallest.accuracy:.4f}, test accuracy "
          f"{search.evaluate(smallest.trial):.4f}")
    return search


if __name__ == "__main__":
    args = sys.argv[1:]  # [work_dir [n_trials]]
    main(*args[:1], *[int(n) for n in args[1:2]], backend=os.environ.get("AUTOPRUNE_EXAMPLE_BACKEND", "ray"))
