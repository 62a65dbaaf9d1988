"""Pruning methods side by side: accuracy, size, MACs and measured speed-up (issue 3).

Run:  .venv/bin/python benchmarks/methods.py [--quick] [--arch NAME ...]

Architectures, all on scikit-learn's digits (8x8 grey images, 1,437 train / 360 val):

* ``digits_cnn`` -- the demo's residual CNN (``search_spaces/digits_demo.make_model``, width 32);
* ``digits_mlp`` -- an MLP with BatchNorm1d on the 64 flattened pixels (64-512-512-10): structured
  units are Linear neurons coupled to a BatchNorm1d, there are no residual blocks, and its Linear
  layers are what int8 dynamic quantization covers;
* ``digits_mobilenet`` (only with ``--arch digits_mobilenet``) -- MobileNetV2-style inverted
  residual blocks, where one structured unit cuts a depthwise conv with its 1x1 neighbours.

Each is pre-trained like the demo (15 epochs, Adam, lr 0.003, seeded), then for each method
and each uniform sparsity (50/75/90 %: every candidate unit of the method gets the same ratio,
``max_layer_sparsity=0.95``) the dense model is pruned with ``autoprune.trial.prune_model``,
fine-tuned (3 epochs, Adam, lr 0.001, same for every row; unstructured zeros held by their
masks) and measured:

* accuracy on the validation split, before ("no-FT") and after fine-tuning;
* parameters (total and non-zero), bytes on disk (``model_files.save_model``: zeros of
  unstructured layers cost one bit), MACs per sample (of the float model for int8 rows);
* latency at batch 1 and batch 64 with 1 thread, timed interleaved with the dense model
  (``measure.time_interleaved``) in 3 separate windows: speed-up = dense/pruned median within a
  window, median over the windows (min-max shown), and efficiency = speed-up / (dense MACs /
  pruned MACs).

Controls: "dense + fine-tune" (the dense model fine-tuned like the others: what the extra epochs
alone do, and the timing noise floor, since its true speed-up is 1) and ``random_structured``.
Block removal (``remove_block``) is shown as "all" and one row per candidate block.  When
``autoprune/quantize.py`` exists, int8 dynamic quantization (after fine-tuning) is added for the
dense model, 75 % l1_unstructured and 50 % l1_structured.  The load average is printed at the
start and the end: the absolute milliseconds depend on it, the interleaved ratios much less
(benchmarks/RESULTS.md, "Latency spread").
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "search_spaces"))

import digits_demo  # noqa: E402

from autoprune import measure, model_files  # noqa: E402
from autoprune.methods import PruneContext, get_method, known_methods  # noqa: E402
from autoprune.methods import unstructured as unstructured_methods  # noqa: E402
from autoprune.plan import LayerPlan, Plan  # noqa: E402
from autoprune.training import TrainSettings, train  # noqa: E402
from autoprune.trial import TrialSettings, make_context, prune_model  # noqa: E402

SEED = 0
PRETRAIN = TrainSettings(epochs=15, optimizer="adam", lr=0.003)
FINETUNE = TrainSettings(epochs=3, optimizer="adam", lr=0.001)
QUICK_FINETUNE = TrainSettings(epochs=1, optimizer="adam", lr=0.001)
SPARSITIES = (0.5, 0.75, 0.9)
SWEPT_METHODS = (
    "l1_unstructured",
    "taylor_unstructured",
    "l1_structured",
    "taylor_structured",
    "bn_scale_structured",
    "random_structured",
)


# --------------------------------------------------------------------------- architectures


class DigitsMLP(nn.Module):
    """flatten 64 -> Linear 512 -> BN -> ReLU -> Linear 512 -> BN -> ReLU -> Linear 10."""

    def __init__(self, hidden: int = 512, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> depthwise 3x3 -> 1x1 project (+ input when shapes match)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class DigitsMobileNet(nn.Module):
    """stem 3x3 (1->24) -> IR(24,24) -> IR(24,48,s2) -> IR(48,48) -> 1x1 (48->128) -> pool -> linear."""

    def __init__(self, num_classes: int = 10, expand: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.features = nn.Sequential(
            InvertedResidual(24, 24, 1, expand),
            InvertedResidual(24, 48, 2, expand),
            InvertedResidual(48, 48, 1, expand),
        )
        self.last = nn.Sequential(nn.Conv2d(48, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.features(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], nn.Module]
    head: str
    description: str


ARCHS = {
    arch.name: arch
    for arch in (
        Arch("digits_cnn", lambda: digits_demo.make_model(32), "fc",
             "demo residual CNN (digits_demo.make_model, width 32)"),
        Arch("digits_mlp", DigitsMLP, "head",
             "MLP with BatchNorm1d on the 64 flattened pixels (64-512-512-10), defined in this script"),
        Arch("digits_mobilenet", DigitsMobileNet, "classifier",
             "MobileNetV2-style: 3 inverted residual blocks (expand 4, depthwise 3x3), defined in this script"),
    )
}
#: Run when no --arch is given (digits_mobilenet is optional: --arch digits_mobilenet).
DEFAULT_ARCHS = ("digits_cnn", "digits_mlp")


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reseed_loader(loader: torch.utils.data.DataLoader, seed: int) -> None:
    """Same shuffling order for every fine-tune, whatever ran before."""
    loader.generator.manual_seed(seed)


def file_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return model_files.save_model(model, tmp).total_bytes


def quantize_available() -> bool:
    return importlib.util.find_spec("autoprune.quantize") is not None


@dataclass
class Row:
    method: str
    target: str
    acc: float | None = None
    acc_before: float | None = None
    params: int = 0
    nonzero: int = 0
    bytes: int = 0
    macs: int = 0
    # batch -> one (pruned median, dense median) per interleaved window
    ms: dict[int, list[tuple[float, float]]] | None = None
    error: str | None = None
    skipped: str | None = None  # why there is nothing to measure (not a failure)
    seconds: float = 0.0


@dataclass
class Bench:
    arch: Arch
    dense: nn.Module
    context: PruneContext
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    inputs: dict[int, torch.Tensor]
    example: torch.Tensor
    rounds: int
    min_run_time: float
    windows: int
    finetune: TrainSettings

    def measure_point(
        self, method: str, target: str, build: Callable[[], nn.Module], unstructured: bool, int8: bool = False
    ) -> Row:
        """Build (prune), fine-tune, optionally int8-quantize, then measure one model."""
        row = Row(method, target)
        started = time.perf_counter()
        try:
            seed_everything(SEED)
            model = build()
            row.acc_before = measure.evaluate_accuracy(model, self.val_loader)
            masks = unstructured_methods.masks_of(model) if unstructured else None
            seed_everything(SEED)
            reseed_loader(self.train_loader, SEED)
            train(model, self.train_loader, self.finetune,
                  after_step=(lambda m: unstructured_methods.apply_masks(m, masks)) if masks else None)
            # MACs of the float model: int8 MACs are still MACs (and FlopCounterMode does not see
            # the quantized kernels at all).
            row.macs = measure.count_macs(model, self.example)
            if int8:
                from autoprune import quantize

                model = quantize.quantize_model(model)
                row.params, row.nonzero = quantize.parameter_counts(model)
            else:
                row.params, row.nonzero = measure.count_parameters(model)
            row.acc = measure.evaluate_accuracy(model, self.val_loader)
            row.bytes = file_bytes(model)
            row.ms = {batch: [] for batch in self.inputs}
            for _ in range(self.windows):
                for batch, x in self.inputs.items():
                    samples = measure.time_interleaved(
                        {"pruned": model, "dense": self.dense}, x, threads=1,
                        rounds=self.rounds, min_run_time=self.min_run_time,
                    )
                    row.ms[batch].append((samples["pruned"].median_ms, samples["dense"].median_ms))
        except Exception as error:  # a failing method is a result too
            row.error = f"{type(error).__name__}: {error}"
        row.seconds = time.perf_counter() - started
        return row


def uniform_plan(method: str, units: list[str], sparsity: float) -> Plan:
    return Plan(tuple(LayerPlan(unit, method, sparsity) for unit in units))


def run_arch(arch: Arch, args: argparse.Namespace) -> tuple[list[Row], dict[str, object]]:
    torch.set_num_threads(1)
    seed_everything(SEED)
    train_loader, val_loader = digits_demo.make_loaders(batch_size=64, seed=SEED)
    seed_everything(SEED)
    dense = arch.build()
    started = time.perf_counter()
    train(dense, train_loader, PRETRAIN)
    pretrain_s = time.perf_counter() - started
    dense.eval()

    val_x = next(iter(val_loader))[0]
    example = val_x[:1].clone()
    inputs = {1: val_x[:1].clone(), 64: val_x[:64].clone()}
    reseed_loader(train_loader, SEED)
    settings = TrialSettings(
        finetune=args.finetune, protected=frozenset({arch.head}), max_layer_sparsity=0.95, seed=SEED
    )
    context = make_context(train_loader, settings, example)

    bench = Bench(arch, dense, context, train_loader, val_loader, inputs, example,
                  rounds=args.rounds, min_run_time=args.min_run_time, windows=args.windows, finetune=args.finetune)
    info: dict[str, object] = {"pretrain_s": pretrain_s}
    dense_params, dense_nonzero = measure.count_parameters(dense)
    dense_row = Row("dense", "-", acc=measure.evaluate_accuracy(dense, val_loader), params=dense_params,
                    nonzero=dense_nonzero, bytes=file_bytes(dense), macs=measure.count_macs(dense, example))
    dense_row.ms = {b: [(measure.reference_latency_ms(dense, x, repeats=3, min_run_time=0.1),) * 2]
                    for b, x in inputs.items()}
    rows = [dense_row]
    # Control: the dense model fine-tuned like every pruned one (do the extra epochs alone help?).
    rows.append(bench.measure_point("dense + fine-tune", "0%", lambda: _copy(dense), unstructured=False))

    candidates: dict[str, list[str]] = {}
    for method in args.methods:
        if method not in known_methods():
            rows.append(Row(method, "-", error="not a registered method"))
            continue
        units = get_method(method).candidates(_copy(dense), context)
        candidates[method] = units
        unstructured = get_method(method).family == "unstructured"
        if not units:
            rows.append(Row(method, "-", skipped="no candidate units in this model"))
            continue
        for sparsity in args.sparsities:
            plan = uniform_plan(method, units, sparsity)
            rows.append(bench.measure_point(
                method, f"{sparsity:.0%}", lambda plan=plan: prune_model(dense, plan, context), unstructured))
            _progress(arch, rows[-1])

    blocks = get_method("remove_block").candidates(_copy(dense), context)
    candidates["remove_block"] = blocks
    if blocks:
        plans = {"all": uniform_plan("remove_block", blocks, 1.0)}
        if len(blocks) > 1:
            plans.update({b: uniform_plan("remove_block", [b], 1.0) for b in blocks})
        for label, plan in plans.items():
            rows.append(bench.measure_point(
                "remove_block", label, lambda plan=plan: prune_model(dense, plan, context), unstructured=False))
            _progress(arch, rows[-1])
    else:
        rows.append(Row("remove_block", "-", skipped="no candidate: the model has no residual block"))

    if quantize_available():
        rows.extend(quantize_rows(bench, dense, candidates))
    info["candidates"] = candidates
    return rows, info


def quantize_rows(bench: Bench, dense: nn.Module, units: dict[str, list[str]]) -> list[Row]:
    """int8 dynamic quantization (autoprune.quantize: nn.Linear layers only) after fine-tuning,
    of the dense model and of two pruned ones."""
    rows = [bench.measure_point("int8 dynamic", "dense", lambda: _copy(dense), unstructured=False, int8=True)]
    _progress(bench.arch, rows[-1])
    for method, sparsity in (("l1_unstructured", 0.75), ("l1_structured", 0.5)):
        if not units.get(method):
            continue
        plan = uniform_plan(method, units[method], sparsity)
        unstructured = get_method(method).family == "unstructured"
        rows.append(bench.measure_point(f"{method} + int8", f"{sparsity:.0%}",
                                        lambda plan=plan: prune_model(dense, plan, bench.context),
                                        unstructured=unstructured, int8=True))
        _progress(bench.arch, rows[-1])
    return rows


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _progress(arch: Arch, row: Row) -> None:
    state = row.error or row.skipped or f"acc {row.acc:.3f}"
    print(f"  [{arch.name}] {row.method} {row.target}: {state} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- report


def _fmt_int(value: int) -> str:
    return f"{value:,}"


def table(rows: list[Row], batches: tuple[int, ...]) -> str:
    dense = rows[0]
    head = ["method", "target", "acc FT", "acc no-FT", "params", "non-zero", "file bytes", "MACs", "MAC red."]
    for b in batches:
        head += [f"b{b} ms pruned/dense", f"b{b} speed-up", f"b{b} eff."]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        if row.error or row.skipped:
            note = f"FAILED: {row.error[:150]}" if row.error else f"n/a: {row.skipped}"
            cells = [row.method, row.target, note] + [""] * (len(head) - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        reduction = dense.macs / row.macs if row.macs else float("nan")
        cells = [
            row.method,
            row.target,
            f"{row.acc:.3f}",
            "-" if row.acc_before is None else f"{row.acc_before:.3f}",
            _fmt_int(row.params),
            _fmt_int(row.nonzero),
            _fmt_int(row.bytes),
            _fmt_int(row.macs),
            f"{reduction:.2f}x",
        ]
        for b in batches:
            windows = row.ms[b]
            pruned_ms = statistics.median(p for p, _ in windows)
            dense_ms = statistics.median(d for _, d in windows)
            speeds = sorted(d / p for p, d in windows)
            speed = statistics.median(speeds)
            if row is dense:
                # The dense model's median over every window of this run (and, for reference, the lowest
                # of 3 medians timed alone before the sweep).
                in_run = [d for other in rows[1:] if other.ms for _, d in other.ms[b]]
                typical = f"{statistics.median(in_run):.4f}" if in_run else "-"
                cells += [f"{typical} (alone {dense_ms:.4f})", "1.00x", "1.00"]
            else:
                spread = f" ({speeds[0]:.2f}-{speeds[-1]:.2f})" if len(speeds) > 1 else ""
                cells += [f"{pruned_ms:.4f}/{dense_ms:.4f}", f"{speed:.2f}x{spread}", f"{speed / reduction:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke variant: 50/90 %% only, 3 methods (+ int8), 1 fine-tune epoch, short timing")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS),
                        help=f"repeatable; default: {', '.join(DEFAULT_ARCHS)}")
    args = parser.parse_args()
    args.sparsities = (0.5, 0.9) if args.quick else SPARSITIES
    args.methods = ("l1_unstructured", "l1_structured", "random_structured") if args.quick else SWEPT_METHODS
    args.rounds, args.min_run_time, args.windows = (3, 0.02, 1) if args.quick else (4, 0.04, 3)
    args.finetune = QUICK_FINETUNE if args.quick else FINETUNE

    started = time.perf_counter()
    load_start = os.getloadavg()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 thread for training and timing, seed {SEED}")
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    ft = args.finetune
    print(f"pretrain: {PRETRAIN.epochs} epochs {PRETRAIN.optimizer} lr {PRETRAIN.lr}; fine-tune: {ft.epochs} "
          f"epochs {ft.optimizer} lr {ft.lr} (unstructured zeros held); sparsities "
          f"{', '.join(f'{s:.0%}' for s in args.sparsities)} uniform over each method's candidates, "
          f"max_layer_sparsity 0.95")
    print(f"latency: {args.windows} window(s) of time_interleaved(pruned, dense) per batch size, rounds "
          f"{args.rounds}, {args.min_run_time} s/model/round; ms = median over windows of each model's median; "
          "speed-up = median over windows of dense/pruned in the same window (min-max over windows); "
          "eff. = speed-up / MAC reduction (dense MACs / pruned MACs)")
    print(f"int8 dynamic quantization: {'included' if quantize_available() else 'skipped (no autoprune/quantize.py)'}")
    for name in args.arch or DEFAULT_ARCHS:
        arch = ARCHS[name]
        arch_started = time.perf_counter()
        rows, info = run_arch(arch, args)
        print(f"\n### {arch.name}: {arch.description}\n")
        print(f"pretrain {info['pretrain_s']:.1f} s; candidate units: "
              + "; ".join(f"{m} {len(u)}" for m, u in info["candidates"].items())
              + f"; remove_block blocks: {', '.join(info['candidates'].get('remove_block', [])) or 'none'}\n")
        print(table(rows, (1, 64)))
        print(f"\n({arch.name}: {time.perf_counter() - arch_started:.0f} s)")
    load_end = os.getloadavg()
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
