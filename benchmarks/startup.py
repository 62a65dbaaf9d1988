"""Start-up time of the commands a user types most, against the interpreter's own start and torch's import.

Each command runs in a fresh process (subprocess wall time, one warm-up run, then the median of
``--repeats``): ``autoprune --help``, ``autoprune run --help``, loading and validating a config
(``load_config('search_spaces/digits_cnn.yaml')``), and ``autoprune front CONFIG`` on a finished tiny study
(2 trials, in-process backend, made once in a temporary directory before the timings). Baselines measured in
the same run: ``python -c pass`` and ``python -c "import torch"``. Targets: --help < 1.5 s, front < 3 s.

    .venv/bin/python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

MODULE = '''
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
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


def make_model():
    return Tiny()


def make_loaders(n=400, batch_size=50):
    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target[:n])
    cut = int(0.75 * n)
    return (DataLoader(TensorDataset(x[:cut], y[:cut]), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(TensorDataset(x[cut:], y[cut:]), batch_size=100))
'''

CONFIG = """
study: {name: tiny, n_trials: 2, sampler: random, seed: 0, baselines: []}
work_dir: work
model: {factory: "tinymod:make_model", pretrain: {epochs: 2, lr: 0.01}}
data: {factory: "tinymod:make_loaders"}
space: {methods: [l1_unstructured, l1_structured], sparsity: {low: 0.1, high: 0.8}}
finetune: {epochs: 1}
latency: {rounds: 1, min_run_time: 0.01}
execution: {backend: in_process}
"""

TARGETS = {"autoprune --help": 1.5, "autoprune run --help": 1.5, "autoprune front CONFIG": 3.0}


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "COLUMNS": "120"}


def _wall(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return seconds


def _finished_study(directory: Path) -> Path:
    (directory / "tinymod.py").write_text(MODULE)
    config = directory / "search.yaml"
    config.write_text(textwrap.dedent(CONFIG))
    seconds = _wall([str(BIN / "autoprune"), "run", str(config)], directory)
    print(f"(tiny study: 'autoprune run' with 2 in-process trials took {seconds:.1f} s, not timed below)")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    python, autoprune = sys.executable, str(BIN / "autoprune")
    with tempfile.TemporaryDirectory(prefix="autoprune-startup-") as tmp:
        config = _finished_study(Path(tmp))
        cases = [
            ("python -c pass", [python, "-c", "pass"]),
            ('python -c "import torch"', [python, "-c", "import torch"]),
            ("autoprune --help", [autoprune, "--help"]),
            ("autoprune run --help", [autoprune, "run", "--help"]),
            ("load_config(digits_cnn.yaml)",
             [python, "-c", "from autoprune.config import load_config; load_config('search_spaces/digits_cnn.yaml')"]),
            ("autoprune front CONFIG", [autoprune, "front", str(config)]),
        ]
        print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f}; wall time of a fresh process, median of {args.repeats} after 1 warm-up")
        print(f"{'command':<30} {'median s':>9} {'min s':>7} {'max s':>7}  target")
        for label, argv in cases:
            _wall(argv, REPO)
            times = [_wall(argv, REPO) for _ in range(args.repeats)]
            median, target = statistics.median(times), TARGETS.get(label)
            verdict = "" if target is None else f"< {target:g} s: {'ok' if median < target else 'MISSED'}"
            print(f"{label:<30} {median:>9.3f} {min(times):>7.3f} {max(times):>7.3f}  {verdict}")


if __name__ == "__main__":
    main()
