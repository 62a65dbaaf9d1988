"""Recovery per fine-tuning epoch after heavy structured pruning (issue 12, item 4).

Run:  .venv/bin/python benchmarks/recovery.py [--seeds 3] [--epochs 1 2] [--sparsities 0.6 0.75]

A MobileNetV2-style depthwise network (``DigitsMobileNet`` of benchmarks/methods.py: the inverted
residual block of tests/zoo.py at digits' 1x8x8 input, 3 blocks, expand 4) is pre-trained once on
scikit-learn's digits (15 epochs, Adam, lr 0.003), then pruned with ``l1_structured`` uniformly over
every candidate unit (``max_layer_sparsity`` 0.95) at each channel sparsity given (0.6 and 0.75
remove 80-90 % of the parameters) and fine-tuned through autoprune's own trial code
(``autoprune.trial.prune_and_finetune``) with each recovery option, on the same budget (Adam, lr
0.001, 1 or 2 epochs, same shuffling order per seed):

* ``plain``: constant lr, no distillation, no BatchNorm recalibration (autoprune's previous behaviour);
* ``bn_recal``: BatchNorm statistics re-estimated from 4 training batches after pruning;
* ``cosine`` / ``onecycle``: the learning-rate schedule (one-cycle's peak is the same lr);
* ``distill``: knowledge distillation from the dense model (weight 0.5 / 0.9, T=4);
* ``all``: bn_recal + cosine + distill 0.5;
* the same schedules at a higher learning rate (``lr 3e-3``; one-cycle peaking at 1e-2): a decaying
  schedule lowers the mean step size, so at a fixed lr it is also a change of step size.

It prints validation accuracy (mean over seeds, min-max), the ratio of each arm's mean accuracy
to ``plain``'s measured in the same run, and the ratio of errors (1 - accuracy; below 1 is better),
plus accuracy right after pruning with and without recalibration (what screening sees).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "search_spaces"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import digits_demo  # noqa: E402
from methods import DigitsMobileNet, reseed_loader, seed_everything, uniform_plan  # noqa: E402

from autoprune import measure  # noqa: E402
from autoprune.methods import get_method  # noqa: E402
from autoprune.training import TrainSettings, recalibrate_batchnorm, train  # noqa: E402
from autoprune.trial import TrialSettings, make_context, prune_and_finetune, prune_model  # noqa: E402

PRETRAIN = TrainSettings(epochs=15, optimizer="adam", lr=0.003)
BN_BATCHES = 4
ARMS: dict[str, dict[str, object]] = {
    "plain": {},
    "bn_recal": {"bn": BN_BATCHES},
    "cosine": {"lr_schedule": "cosine"},
    "onecycle": {"lr_schedule": "onecycle"},
    "distill 0.5": {"distill_weight": 0.5},
    "distill 0.9": {"distill_weight": 0.9},
    "all": {"bn": BN_BATCHES, "lr_schedule": "cosine", "distill_weight": 0.5},
    "plain lr 3e-3": {"lr": 0.003},
    "cosine lr 3e-3": {"lr": 0.003, "lr_schedule": "cosine"},
    "onecycle peak 1e-2": {"lr": 0.01, "lr_schedule": "onecycle"},
    "bn_recal + cosine lr 3e-3": {"bn": BN_BATCHES, "lr": 0.003, "lr_schedule": "cosine"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.6, 0.75])
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    seed_everything(0)
    train_loader, val_loader = digits_demo.make_loaders(batch_size=64, seed=0)
    dense = DigitsMobileNet()
    train(dense, train_loader, PRETRAIN)
    dense.eval()
    dense_acc = measure.evaluate_accuracy(dense, val_loader)
    dense_params = measure.count_parameters(dense)[0]
    example = next(iter(val_loader))[0][:1]
    base = TrialSettings(finetune=TrainSettings(epochs=1, lr=0.001), protected=frozenset({"classifier"}),
                         max_layer_sparsity=0.95)
    reseed_loader(train_loader, 0)
    context = make_context(train_loader, base, example)
    units = get_method("l1_structured").candidates(dense, context)
    print(f"dense DigitsMobileNet: val accuracy {dense_acc:.4f}, {dense_params} parameters; "
          f"{len(units)} l1_structured units; pre-training {time.perf_counter() - started:.1f}s")

    for sparsity in args.sparsities:
        plan = uniform_plan("l1_structured", units, sparsity)
        pruned = prune_model(dense, plan, context)
        params = measure.count_parameters(pruned)[0]
        no_ft = measure.evaluate_accuracy(pruned, val_loader)
        reseed_loader(train_loader, 0)
        recalibrate_batchnorm(pruned, train_loader, BN_BATCHES)
        no_ft_bn = measure.evaluate_accuracy(pruned, val_loader)
        print(f"\n### l1_structured {sparsity:.0%} of channels: {params} parameters "
              f"({1 - params / dense_params:.1%} removed); accuracy right after pruning {no_ft:.4f}, "
              f"after BN recalibration ({BN_BATCHES} batches) {no_ft_bn:.4f}")
        print(f"| arm | {' | '.join(f'{e} ep: acc (min-max) | ratio | err ratio' for e in args.epochs)} | s/run |")
        print("|---|" + "---|---|---|" * len(args.epochs) + "---|")
        plain: dict[int, float] = {}
        for arm, options in ARMS.items():
            cells, seconds = [], []
            for epochs in args.epochs:
                finetune = replace(base.finetune, epochs=epochs, lr=float(options.get("lr", 0.001)),  # type: ignore[arg-type]
                                   lr_schedule=str(options.get("lr_schedule", "constant")),
                                   distill_weight=float(options.get("distill_weight", 0.0)))  # type: ignore[arg-type]
                settings = replace(base, finetune=finetune, bn_recalibration_batches=int(options.get("bn", 0)))  # type: ignore[call-overload]
                accs = []
                for seed in range(args.seeds):
                    seed_everything(seed)
                    reseed_loader(train_loader, seed)
                    t0 = time.perf_counter()
                    model, _ = prune_and_finetune(dense, train_loader, plan, settings, context)
                    seconds.append(time.perf_counter() - t0)
                    accs.append(measure.evaluate_accuracy(model, val_loader))
                mean = statistics.mean(accs)
                plain.setdefault(epochs, mean)
                ratio = mean / plain[epochs]
                err_ratio = (1 - mean) / max(1e-9, 1 - plain[epochs])
                cells.append(f"{mean:.4f} ({min(accs):.3f}-{max(accs):.3f}) | {ratio:.3f}x | {err_ratio:.2f}x")
            print(f"| {arm} | {' | '.join(cells)} | {statistics.mean(seconds):.2f} |")
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
