"""The torch-only trial core on a GPU: pre-train, one trial (structured pruning + bf16 fine-tuning + latency),
save/load, on CUDA and on the CPU for the same plan.

Made for a GPU machine that has torch and nothing else of ours but a Torch-Pruning wheel: it imports only
torch, torch_pruning and autoprune's torch-only core (``trial``, ``methods``, ``measure``, ``training``,
``model_files``), never Optuna, Ray or MLflow (checked at the end). Without CUDA it runs the CPU half and says
that CUDA is unavailable.

    python benchmarks/gpu_check.py [--epochs 2] [--width 32] [--latency-batch 32]

Prints, per device: the trial's wall time and its fine-tuning seconds, accuracy (bf16 evaluation) and the
accuracy of the saved model reloaded on the CPU, and latency dense / pruned; then trial time GPU vs CPU and the
CUDA latency ratio pruned/dense.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autoprune.measure import evaluate_accuracy
from autoprune.model_files import SKELETON_FILE, WEIGHTS_FILE, load_model
from autoprune.plan import LayerPlan, Plan
from autoprune.training import TrainSettings, train
from autoprune.trial import TrialSettings, measure_dense, run_trial

CLASSES = 10


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks and a linear head: channels to prune, BatchNorm to recalibrate."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width)
        self.conv3, self.bn3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make_data(n_train: int = 2048, n_val: int = 512, size: int = 32) -> tuple[DataLoader, DataLoader]:
    """Generated images: each class is a fixed random pattern, each sample that pattern plus noise."""
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(CLASSES, 3, size, size, generator=g)

    def split(n: int) -> TensorDataset:
        y = torch.randint(0, CLASSES, (n,), generator=g)
        return TensorDataset(templates[y] + 1.5 * torch.randn(n, 3, size, size, generator=g), y)

    pin = torch.cuda.is_available()  # batches then copy to the GPU asynchronously (non_blocking)
    return (DataLoader(split(n_train), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0),
                       pin_memory=pin),
            DataLoader(split(n_val), batch_size=128, pin_memory=pin))


def one_device(device: str, dense: nn.Module, loaders: tuple[DataLoader, DataLoader], plan: Plan,
               args: argparse.Namespace) -> dict[str, float]:
    """Baseline, one trial and a save/load round trip on ``device``; returns the numbers printed."""
    train_loader, val_loader = loaders
    settings = TrialSettings(finetune=TrainSettings(epochs=args.epochs, lr=1e-3, precision="bf16"),
                             protected=frozenset({"fc"}), device=device, eval_precision="bf16",
                             latency_batch=args.latency_batch, latency_rounds=3, bn_recalibration_batches=4)
    baseline = measure_dense(dense, val_loader, settings)
    started = time.perf_counter()
    output = run_trial(dense, train_loader, val_loader, plan, settings, baseline)
    seconds = time.perf_counter() - started
    result = output.result
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / WEIGHTS_FILE).write_bytes(output.weights)
        (Path(tmp) / SKELETON_FILE).write_bytes(output.skeleton)
        loaded = load_model(tmp)
    on_cpu = all(p.device.type == "cpu" for p in loaded.parameters())
    reloaded = evaluate_accuracy(loaded, val_loader, precision="bf16")
    print(f"[{device}] dense: accuracy {baseline.accuracy:.4f}, latency {baseline.latency_ms:.4f} ms "
          f"(batch {args.latency_batch}, timed on {baseline.latency_device}), {baseline.params:,} params")
    print(f"[{device}] trial: {seconds:.2f} s wall ({result.train_seconds:.2f} s fine-tuning, bf16); accuracy "
          f"{result.accuracy:.4f}; {result.params:,} params; latency {result.latency_ms:.4f} ms "
          f"(pruned/dense {result.latency_ratio:.3f})"
          + (f"; GPU peak memory {result.extra['gpu_peak_memory_mb']:.0f} MiB" if device == "cuda" else ""))
    print(f"[{device}] saved model reloaded on the CPU: {on_cpu}, accuracy there {reloaded:.4f}")
    if not on_cpu:
        raise SystemExit(f"[{device}] the saved model did not load onto the CPU")
    return {"seconds": seconds, "train_seconds": result.train_seconds, "ratio": result.latency_ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs of the trial")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--latency-batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaders = make_data()
    dense = SmallCNN(args.width).eval()
    started = time.perf_counter()
    pre_device = "cuda" if torch.cuda.is_available() else "cpu"
    train(dense.to(pre_device), loaders[0], TrainSettings(epochs=3, lr=3e-3, precision="bf16"))
    dense.to("cpu")
    print(f"torch {torch.__version__}; pre-trained the dense model on {pre_device} in "
          f"{time.perf_counter() - started:.2f} s (3 epochs, bf16)")
    plan = Plan(tuple(LayerPlan(layer, "l1_structured", 0.5) for layer in ("conv1", "conv2", "conv3")))
    numbers = {}
    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.get_device_name(0)}")
        numbers["cuda"] = one_device("cuda", dense, loaders, plan, args)
    else:
        print(f"CUDA is unavailable here (torch.cuda.is_available() is False; torch built for CUDA "
              f"{torch.version.cuda}): only the CPU half runs")
    numbers["cpu"] = one_device("cpu", dense, loaders, plan, args)
    if "cuda" in numbers:
        gpu, cpu = numbers["cuda"], numbers["cpu"]
        print(f"trial time GPU vs CPU: {gpu['seconds']:.2f} s vs {cpu['seconds']:.2f} s "
              f"({cpu['seconds'] / gpu['seconds']:.1f}x); fine-tuning {gpu['train_seconds']:.2f} s vs "
              f"{cpu['train_seconds']:.2f} s")
        print(f"CUDA latency ratio pruned/dense: {gpu['ratio']:.3f} (CPU: {cpu['ratio']:.3f})")
    heavy = [name for name in ("optuna", "ray", "mlflow") if name in sys.modules]
    if heavy:
        raise SystemExit(f"the torch-only core imported {heavy}")
    print("imports: torch, torch_pruning and autoprune's core only (no optuna, ray or mlflow)")


if __name__ == "__main__":
    main()
