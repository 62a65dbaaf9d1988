"""Does autoprune's search beat the one-line rules? (issue 12, item 6)

Run:  .venv/bin/python benchmarks/search_quality.py [--quick] [--arch NAME ...] [--trials N]

Four architectures on scikit-learn's digits (1,797 8x8 images split 60/20/20 into train / val / test
with a fixed seed): the demo's residual CNN (``search_spaces/digits_demo.make_model``, width 32), a
MobileNetV2-style depthwise net (``DigitsMobileNet`` of benchmarks/methods.py, the inverted residual
block of tests/zoo.py), a DenseNet-style concatenating net and a stock ``nn.TransformerEncoder``
reading the 8 image rows as 8 tokens (both defined here after tests/zoo.py). Each dense model is
trained once and shared by every arm; every pruned model is fine-tuned the same way (autoprune's
``finetune`` defaults at ``--epochs`` epochs, Adam lr 0.001, BatchNorm recalibration as configured)
and then measured here, the same way for every arm:

* accuracy on the **test** split (the search selects on val; the fronts below are on test);
* non-zero parameters as a fraction of the dense model's;
* batch-64 latency, 1 thread, timed interleaved with the dense model (``measure.time_interleaved``):
  the ratio pruned/dense; a model with all of the dense model's parameters (unstructured zeros
  only) runs dense kernels and gets ratio 1.0 without timing.

Arms:
* ``search``: autoprune's default search through the Python API (``autoprune.Search``, TPE, the
  uniform baselines it enqueues, ``execution.backend: in_process``), methods l1_structured +
  l1_unstructured, sparsity 0-0.9 step 0.05, ``--trials`` trials;
* ``search_global``: the same with ``space.parametrization: global`` (a whole-model sparsity and a rule
  whose per-unit allocation each unit shifts; the rules are points of that space);
* ``random``: the per-unit space with Optuna's random sampler and no baselines;
* ``uniform_s``: every structured unit at 25/50/75 % (l1_structured);
* ``uniform_u``: every layer at 50/75/90 % (l1_unstructured);
* ``global_mag``: one magnitude threshold over all Conv/Linear weights but the head
  (``torch.nn.utils.prune.global_unstructured``) at 50/75/90/95 %;
* ``global_s``: Torch-Pruning ``MetaPruner(global_pruning=True)`` with group L2 magnitude (mean-normalised)
  at 25/50/75 % of channels (attention modules ignored);
* ``width``: the dense architecture 25/50/75 % narrower (every channel group, uniform structured shapes),
  re-initialized and trained from scratch for the dense model's pre-training plus fine-tuning epochs
  (not a simple rule: it is not in the union, and its epochs count pre-training).

Printed per architecture: each arm's hypervolume on (test accuracy up, non-zero parameter fraction
down) and on (test accuracy up, batch-64 latency fraction down), reference point (0, 1.0), also as a
ratio to the union of the four simple-rule arms; the smallest model (non-zero fraction) within 0.5 and
1 point of the dense test accuracy; the best batch-64 speed-up within 1 point; trials; wall seconds
(pruning + fine-tuning + the search's own measuring and bookkeeping; not this script's re-measuring).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "search_spaces"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import digits_demo  # noqa: E402
from methods import DigitsMobileNet, seed_everything, uniform_plan  # noqa: E402
from optuna._hypervolume import compute_hypervolume  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import autoprune  # noqa: E402
from autoprune import measure  # noqa: E402
from autoprune.config import FinetuneConfig  # noqa: E402
from autoprune.methods import get_method  # noqa: E402
from autoprune.training import TrainSettings, recalibrate_batchnorm, train  # noqa: E402
from autoprune.trial import TrialSettings, make_context, prune_and_finetune  # noqa: E402

SIMPLE = ("uniform_s", "uniform_u", "global_mag", "global_s")


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], dim=1)


class DigitsDenseNet(nn.Module):
    """stem 3x3 (1->16) -> 3 dense layers (growth 12) -> transition 1x1 (52->32) -> 2 dense layers -> linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.block1 = nn.Sequential(DenseLayer(16, 12), DenseLayer(28, 12), DenseLayer(40, 12))
        self.transition = nn.Sequential(nn.BatchNorm2d(52), nn.ReLU(), nn.Conv2d(52, 32, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(32, 12), DenseLayer(44, 12))
        self.norm = nn.BatchNorm2d(56)
        self.classifier = nn.Linear(56, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.block2(self.transition(self.block1(self.stem(x))))))
        return self.classifier(x.mean(dim=(2, 3)))


class DigitsTransformer(nn.Module):
    """The 8 image rows as 8 tokens of 8 pixels: linear embed (8->32) -> 2 stock encoder layers
    (4 heads, feed-forward 128) -> mean over tokens -> linear."""

    def __init__(self, num_classes: int = 10, d_model: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(torch.zeros(1, 8, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(1, 2)) + self.pos
        return self.head(self.encoder(tokens).mean(dim=1))


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], nn.Module]
    head: str
    lr: float = 0.003


ARCHS = {a.name: a for a in (
    Arch("digits_cnn", lambda: digits_demo.make_model(32), "fc"),
    Arch("mobilenet", DigitsMobileNet, "classifier"),
    Arch("densenet", DigitsDenseNet, "classifier"),
    Arch("transformer", DigitsTransformer, "head", lr=0.001),
)}


def digits_splits(seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    parts = [order[:a], order[a:b], order[b:]]
    train_loader = DataLoader(TensorDataset(x[parts[0]], y[parts[0]]), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
    val_loader, test_loader = (DataLoader(TensorDataset(x[p], y[p]), batch_size=256) for p in parts[1:])
    return train_loader, val_loader, test_loader


@dataclass
class Point:
    accuracy: float
    nonzero: float  # fraction of the dense model's non-zero parameters
    latency: float  # batch-64 latency as a fraction of the dense model's


@dataclass
class ArmResult:
    points: list[Point] = field(default_factory=list)
    seconds: float = 0.0
    epochs: float = 0.0  # fine-tuning epochs spent in all
    failed: int = 0
    note: str = ""


class Bench:
    def __init__(self, arch: Arch, args: argparse.Namespace, work: Path) -> None:
        self.arch, self.args, self.work = arch, args, work
        seed_everything(0)
        self.train_loader, self.val_loader, self.test_loader = digits_splits()
        self.dense = arch.build()
        started = time.perf_counter()
        train(self.dense, self.train_loader, TrainSettings(epochs=args.pretrain_epochs, lr=arch.lr))
        self.pretrain_s = time.perf_counter() - started
        self.dense.eval()
        self.dense_acc = measure.evaluate_accuracy(self.dense, self.test_loader)
        self.dense_params, self.dense_nonzero = measure.count_parameters(self.dense)
        self.x64 = next(iter(self.val_loader))[0][:64].clone()
        self.example = self.x64[:1].clone()
        ft = FinetuneConfig(epochs=args.epochs, lr=args.lr, lr_schedule=args.lr_schedule)
        self.settings = TrialSettings(
            finetune=TrainSettings(epochs=ft.epochs, optimizer=ft.optimizer, lr=ft.lr, lr_schedule=ft.lr_schedule,
                                   distill_weight=ft.distill.weight if ft.distill else 0.0),
            protected=frozenset({arch.head}), max_layer_sparsity=0.95,
            bn_recalibration_batches=ft.bn_recalibration_batches)
        self.ft = ft
        self.context = make_context(self.train_loader, self.settings, self.example)

    # ---- measuring, the same for every arm ----
    def point(self, model: nn.Module) -> Point:
        params, nonzero = measure.count_parameters(model)
        if params >= self.dense_params:
            latency = 1.0  # dense shapes: zeros do not speed up dense kernels
        else:
            ratios = []
            for _ in range(self.args.windows):
                s = measure.time_interleaved({"p": model, "d": self.dense}, self.x64, threads=1,
                                             rounds=self.args.rounds, min_run_time=self.args.min_run_time)
                ratios.append(s["p"].median_ms / s["d"].median_ms)
            latency = statistics.median(ratios)
        return Point(measure.evaluate_accuracy(model, self.test_loader), nonzero / self.dense_nonzero, latency)

    def finetune(self, model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
        from autoprune.methods.unstructured import apply_masks

        recalibrate_batchnorm(model, self.train_loader, self.settings.bn_recalibration_batches)
        train(model, self.train_loader, self.settings.finetune, teacher=self.dense,
              after_step=(lambda m: apply_masks(m, masks)) if masks else None)

    # ---- arms ----
    def uniform(self, method: str, sparsities: tuple[float, ...]) -> ArmResult:
        result = ArmResult()
        units = get_method(method).candidates(copy.deepcopy(self.dense), self.context)
        models = []
        started = time.perf_counter()
        for s in sparsities:
            seed_everything(0)
            try:
                models.append(prune_and_finetune(self.dense, self.train_loader, uniform_plan(method, units, s),
                                                 self.settings, self.context)[0])
            except Exception as exc:
                result.failed += 1
                result.note = f"{type(exc).__name__}: {str(exc)[:80]}"
        result.seconds = time.perf_counter() - started
        result.points = [self.point(m) for m in models]
        return result

    def global_magnitude(self, sparsities: tuple[float, ...]) -> ArmResult:
        from torch.nn.utils import prune

        from autoprune.methods.unstructured import masks_of

        result, models = ArmResult(), []
        started = time.perf_counter()
        for s in sparsities:
            seed_everything(0)
            model = copy.deepcopy(self.dense)
            layers = [(m, "weight") for n, m in model.named_modules()
                      if isinstance(m, nn.Conv2d | nn.Linear) and n != self.arch.head
                      and not n.endswith("out_proj")]  # MultiheadAttention reads out_proj.weight directly
            prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=s)
            for module, name in layers:
                prune.remove(module, name)
            self.finetune(model, masks_of(model))
            models.append(model)
        result.seconds = time.perf_counter() - started
        result.points = [self.point(m) for m in models]
        return result

    def global_structured(self, sparsities: tuple[float, ...]) -> ArmResult:
        import torch_pruning as tp

        result, models = ArmResult(), []
        started = time.perf_counter()
        for s in sparsities:
            seed_everything(0)
            model = copy.deepcopy(self.dense)
            modules = dict(model.named_modules())
            ignored = [modules[self.arch.head]] + [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
            try:
                importance = tp.importance.GroupMagnitudeImportance(p=2)
                pruner = tp.pruner.MetaPruner(model, self.example, importance=importance, global_pruning=True,
                                              pruning_ratio=s, ignored_layers=ignored,
                                              max_pruning_ratio=0.95)
                pruner.step()
                self.finetune(model, None)
                models.append(model)
            except Exception as exc:
                result.failed += 1
                result.note = f"{type(exc).__name__}: {str(exc)[:80]}"
        result.seconds = time.perf_counter() - started
        result.points = [self.point(m) for m in models]
        return result

    def width(self, fractions: tuple[float, ...]) -> ArmResult:
        """The dense architecture with ``fraction`` of every prunable channel group's channels removed
        (uniform structured pruning gives the shapes), re-initialized and trained from scratch with the
        dense model's pre-training plus the fine-tuning budget (Liu et al. 2019, "Rethinking the Value of
        Network Pruning"): is pruning worth more than a smaller model trained from the start?"""
        from autoprune.trial import prune_model

        result, models = ArmResult(), []
        units = get_method("l1_structured").candidates(copy.deepcopy(self.dense), self.context)
        started = time.perf_counter()
        for fraction in fractions:
            seed_everything(0)
            model = prune_model(self.dense, uniform_plan("l1_structured", units, fraction), self.context)
            for module in model.modules():
                if hasattr(module, "reset_parameters") and module is not model:
                    module.reset_parameters()
            epochs = self.args.pretrain_epochs + self.args.epochs
            train(model, self.train_loader, TrainSettings(epochs=epochs, lr=self.arch.lr))
            result.epochs += epochs
            models.append(model.eval())
        result.seconds = time.perf_counter() - started
        result.points = [self.point(m) for m in models]
        return result

    def search(self, name: str, sampler: str, baselines: list[float] | None,
               parametrization: str = "per_unit") -> ArmResult:
        config = {
            "study": {"name": f"{self.arch.name}-{name}", "n_trials": self.args.trials, "sampler": sampler,
                      "seed": 0, "baselines": baselines},
            "work_dir": str(self.work / name),
            "space": {"methods": ["l1_structured", "l1_unstructured"], "sparsity": {"low": 0.0, "high": 0.9,
                                                                                  "step": 0.05},
                      "parametrization": parametrization},
            "finetune": {"epochs": self.args.epochs, "lr": self.args.lr, "lr_schedule": self.args.lr_schedule,
                         "screening": {"enabled": self.args.screening or self.args.halving is not None,
                                       **({"max_dominated": self.args.halving, "min_accuracy_fraction": 0.0}
                                          if self.args.halving is not None else {})}},
            "latency": {"batch_size": 64, "rounds": 2, "min_run_time": 0.01},
            "execution": {"backend": "in_process"},
            "tracking": {"log_models": False},
        }
        if baselines is None:
            del config["study"]["baselines"]
        search = autoprune.Search(config, model=self.dense, train_data=self.train_loader, val_data=self.val_loader)
        started = time.perf_counter()
        search.run()
        result = ArmResult(seconds=time.perf_counter() - started)
        result.epochs = sum(t.user_attrs.get("finetune_epochs_spent", 0.0) for t in search.study.get_trials())
        for record in search.trials():
            if record.state != "COMPLETE":
                result.failed += record.state == "FAIL"  # WAITING: enqueued baselines beyond n_trials
                result.note = (record.fail_reason or "")[:80]
                continue
            result.points.append(self.point(search.load_model(record.trial)))
        return result


def hypervolume(points: list[Point], axis: str, floor: float = 0.0) -> float:
    """Hypervolume dominated on (accuracy up, ``axis`` down) over the reference (``floor``, 1.0)."""
    losses = np.array([[-p.accuracy, getattr(p, axis)] for p in points], dtype=float).reshape(-1, 2)
    reference = np.array([-floor, 1.0])
    inside = losses[np.all(losses < reference, axis=1)]
    return float(compute_hypervolume(inside, reference)) if len(inside) else 0.0


def smallest_within(points: list[Point], dense_acc: float, points_drop: float) -> str:
    ok = [p.nonzero for p in points if p.accuracy >= dense_acc - points_drop / 100 - 1e-9]
    return f"{min(ok):.1%}" if ok else "-"


def best_speedup(points: list[Point], dense_acc: float) -> str:
    ok = [1 / p.latency for p in points if p.accuracy >= dense_acc - 0.01 - 1e-9]
    return f"{max(ok):.2f}x" if ok else "-"


def run_arch(arch: Arch, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(arch, args, Path(tmp))
        print(f"\n## {arch.name}: dense test accuracy {bench.dense_acc:.4f}, {bench.dense_params} parameters; "
              f"pre-training {bench.pretrain_s:.0f}s; fine-tuning {args.epochs} epoch(s) per model")
        arms: dict[str, ArmResult] = {}
        arms["search"] = bench.search("search", "tpe", None)
        arms["search_global"] = bench.search("search_global", "tpe", None, parametrization="global")
        arms["random"] = bench.search("random", "random", [])
        arms["uniform_s"] = bench.uniform("l1_structured", (0.25, 0.5, 0.75))
        arms["uniform_u"] = bench.uniform("l1_unstructured", (0.5, 0.75, 0.9))
        arms["global_mag"] = bench.global_magnitude((0.5, 0.75, 0.9, 0.95))
        arms["global_s"] = bench.global_structured((0.25, 0.5, 0.75))
        arms["width"] = bench.width((0.25, 0.5, 0.75))
    union = [p for name in SIMPLE for p in arms[name].points]
    near = bench.dense_acc - 0.05  # the region users care about: at most 5 points below dense
    hv_union = {axis: hypervolume(union, axis) for axis in ("nonzero", "latency")}
    hv_union["near"] = hypervolume(union, "nonzero", near)
    for name in SIMPLE:
        arms[name].epochs = len(arms[name].points) * args.epochs
    print("| arm | models (failed) | FT epochs | HV acc x size | vs rules | HV size, drop <= 5 pt | vs rules | "
          "HV acc x latency | vs rules | smallest within 0.5 pt | within 1 pt | best b64 speed-up within 1 pt | "
          "wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [*arms.items(), ("rules (union)", ArmResult(points=union,
                                                      seconds=sum(arms[n].seconds for n in SIMPLE),
                                                      epochs=sum(arms[n].epochs for n in SIMPLE)))]
    for name, arm in rows:
        hv = {axis: hypervolume(arm.points, axis) for axis in ("nonzero", "latency")}
        hv["near"] = hypervolume(arm.points, "nonzero", near)
        ratio = {axis: hv[axis] / hv_union[axis] if hv_union[axis] else float("nan") for axis in hv}
        print(f"| {name} | {len(arm.points)} ({arm.failed}) | {arm.epochs:.1f} | {hv['nonzero']:.4f} | "
              f"{ratio['nonzero']:.2f}x | {hv['near']:.4f} | {ratio['near']:.2f}x | "
              f"{hv['latency']:.4f} | {ratio['latency']:.2f}x | {smallest_within(arm.points, bench.dense_acc, 0.5)} | "
              f"{smallest_within(arm.points, bench.dense_acc, 1.0)} | {best_speedup(arm.points, bench.dense_acc)} | "
              f"{arm.seconds:.0f} |")
    for name, arm in arms.items():
        if arm.note:
            print(f"note {name}: {arm.failed} failed, e.g. {arm.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials and epochs: under ~10 min on 2 cores")
    parser.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--screening", action="store_true", help="finetune.screening.enabled in the search arms")
    parser.add_argument("--halving", type=int, default=None, metavar="N",
                        help="successive halving in the search arms: finetune.screening.max_dominated N")
    parser.add_argument("--lr", type=float, default=FinetuneConfig().lr, help="finetune.lr of every arm")
    parser.add_argument("--lr-schedule", default=FinetuneConfig().lr_schedule,
                        choices=["constant", "cosine", "onecycle"], help="finetune.lr_schedule of every arm")
    args = parser.parse_args()
    args.trials = args.trials or (16 if args.quick else 40)
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.pretrain_epochs = 12 if args.quick else 20
    args.rounds, args.min_run_time, args.windows = (2, 0.01, 1) if args.quick else (3, 0.03, 3)
    started = time.perf_counter()
    screening = f"halving N={args.halving}" if args.halving else "on" if args.screening else "off"
    print(f"search_quality: {args.trials} trials per search arm, {args.epochs} fine-tuning epoch(s) per model "
          f"(lr {args.lr:g} {args.lr_schedule}; screening {screening}), batch-64 latency 1 thread "
          f"({args.windows} window(s) x {args.rounds} rounds)")
    for name in args.arch:
        run_arch(ARCHS[name], args)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
