"""Orchestration overhead of the search loop, and parallel throughput.

1. Overhead per trial: the real search loop (Optuna ask/tell on SQLite, one Ray task per trial, MLflow
   logging, trial files) with a trivial trial (a 16->8->4 MLP, one batch, no fine-tuning), one trial at a
   time, against calling the same trial function directly in this process. Overhead = median interval
   between two trial completions in the loop - median time of a direct call. Target: <= 0.5 s.
2. Throughput of 2 parallel trials against 1 (1 thread per trial, a CPU-bound trial of about 1.5 s:
   the digits CNN fine-tuned for 12 epochs), both through the real loop. Target: >= 1.7x.

Both baselines are measured in the same run. Steady state only: completions before the first `parallel`
ones (worker start-up) are left out.

    .venv/bin/python benchmarks/overhead.py [--trials 16] [--throughput-trials 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

MODULE = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits


def trivial_model():
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def trivial_loaders():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32), DataLoader(TensorDataset(x, y), batch_size=32)


class CNN(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


def cnn():
    return CNN()


def digits(n=1797):
    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target[:n])
    cut = int(0.75 * n)
    return (DataLoader(TensorDataset(x[:cut], y[:cut]), batch_size=50, shuffle=True,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(TensorDataset(x[cut:], y[cut:]), batch_size=100))
'''

TRIVIAL = """
study: {name: trivial, n_trials: 16, sampler: tpe, seed: 0}
work_dir: trivial
model: {factory: "benchmod:trivial_model", pretrain: {epochs: 1}}
data: {factory: "benchmod:trivial_loaders"}
space: {methods: [l1_unstructured], sparsity: {low: 0.1, high: 0.9}}
finetune: {epochs: 0}
latency: {rounds: 1, min_run_time: 0.001}
execution: {parallel: 1, cpus_per_trial: 1}
"""

WORK = """
study: {name: work, n_trials: 10, sampler: random, seed: 0}
work_dir: work
model: {factory: "benchmod:cnn", pretrain: {epochs: 2, lr: 0.01}}
data: {factory: "benchmod:digits"}
space: {methods: [l1_unstructured], sparsity: {low: 0.1, high: 0.9}}
finetune: {epochs: 12}
latency: {rounds: 1, min_run_time: 0.01}
execution: {parallel: 1, cpus_per_trial: 1}
"""


def completions(config) -> list[float]:
    """Run the search; return the time of each trial completion."""
    from autoprune.search import run_search

    times: list[float] = []

    def on_progress(p) -> None:
        if p.message.startswith("trial "):
            times.append(time.perf_counter())

    summary = run_search(config, on_progress=on_progress)
    assert summary.completed == config.study.n_trials, summary
    return times


def direct_seconds(config, n: int) -> list[float]:
    """The same trial function called in this process (the loop's trials, re-run with the same plans)."""
    import optuna
    import torch

    from autoprune.execution import TrialPayload, execute
    from autoprune.inputs import build_inputs, ensure_dense
    from autoprune.trial import DenseBaseline

    inputs = build_inputs(config)
    dense = ensure_dense(config, inputs)
    study = optuna.load_study(study_name=config.study.name, storage=config.storage_url)
    baseline = DenseBaseline(**study.user_attrs["autoprune.dense"])
    payload = TrialPayload(dense, inputs.train_loader, inputs.val_loader, inputs.settings, baseline, threads=1)
    previous = torch.get_num_threads()
    seconds = []
    for trial in study.get_trials()[:n]:
        plan = inputs.space.decode(trial.params)
        started = time.perf_counter()
        execute(payload, plan)
        seconds.append(time.perf_counter() - started)
    torch.set_num_threads(previous)
    return seconds


def steady_intervals(times: list[float], parallel: int) -> list[float]:
    return [b - a for a, b in zip(times[parallel - 1:], times[parallel:], strict=False)]


def throughput(times: list[float], parallel: int) -> float:
    """Trials per second after the first ``parallel`` completions."""
    steady = times[parallel - 1:]
    return (len(steady) - 1) / (steady[-1] - steady[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="trivial trials through the loop")
    parser.add_argument("--throughput-trials", type=int, default=10, help="trials per throughput run")
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per setting (alternated)")
    args = parser.parse_args()

    from autoprune.config import load_config

    root = Path(tempfile.mkdtemp(prefix="autoprune-overhead-"))
    (root / "benchmod.py").write_text(MODULE)
    (root / "trivial.yaml").write_text(textwrap.dedent(TRIVIAL))
    (root / "work.yaml").write_text(textwrap.dedent(WORK))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; work dir {root}",
          flush=True)

    # 1. overhead per trial
    config = load_config(root / "trivial.yaml", [f"study.n_trials={args.trials}"])
    started = time.perf_counter()
    times = completions(config)
    total = time.perf_counter() - started
    loop = statistics.median(steady_intervals(times, 1))
    direct = statistics.median(direct_seconds(config, args.trials))
    overhead = loop - direct
    print(f"\n[overhead] {args.trials} trivial trials, 1 at a time (TPE, SQLite, local Ray, MLflow on SQLite)")
    print(f"  direct call of the trial function : {direct * 1000:8.1f} ms per trial (median)")
    print(f"  through the search loop           : {loop * 1000:8.1f} ms per trial (median interval between "
          f"completions)")
    print(f"  orchestration overhead            : {overhead * 1000:8.1f} ms per trial  -> "
          f"{loop / direct:.1f}x the direct call; target <= 500 ms: {'met' if overhead <= 0.5 else 'MISSED'}")
    print(f"  (whole run incl. start-up: {total:.1f} s for {args.trials} trials)")

    # 2. throughput, 1 vs 2 parallel trials, alternated so that a change in machine load hits both
    rates: dict[int, list[float]] = {1: [], 2: []}
    print(f"\n[throughput] {args.throughput_trials} CPU-bound trials per run (digits CNN, 12 fine-tuning epochs, "
          f"1 thread per trial), runs alternated")
    for repeat in range(args.repeats):
        for parallel in (1, 2):
            cfg = load_config(root / "work.yaml", [
                f"study.n_trials={args.throughput_trials}", f"execution.parallel={parallel}",
                f"study.name=work-p{parallel}-{repeat}"])
            t = completions(cfg)
            rates[parallel].append(throughput(t, parallel))
            print(f"  run {repeat + 1}, parallel={parallel}: {rates[parallel][-1]:.3f} trials/s "
                  f"({1 / rates[parallel][-1]:.2f} s per trial; load average {os.getloadavg()[0]:.2f})", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    ratio = two / one
    print(f"  median: parallel=1 {one:.3f} trials/s, parallel=2 {two:.3f} trials/s")
    print(f"  2 parallel / 1 parallel = {ratio:.2f}x; target >= 1.7x: {'met' if ratio >= 1.7 else 'MISSED'}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end (other processes on the machine skew both numbers)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
