"""Spread of repeated latency measurements, alone and next to a second CPU-bound "trial".

Run:  .venv/bin/python benchmarks/latency_spread.py [--repeats N] [--quick]

A small CNN (2 conv layers + linear, 1x8x8 inputs) and a hand-made 50 %-channel-pruned variant
are timed single-threaded at batch 1 and 64:

(a) alone: N repeats of ``time_model`` on each model;
(b) while other processes run a CPU-bound torch training loop with 1 thread each (simulating
    parallel trials): N repeats of the raw ``time_model`` of the pruned model, interleaved with
    N repeats of the ``honest_latency_ms`` estimate (pruned and dense timed round-robin, ratio
    scaled by the dense model's latency measured alone).

For each series it prints min / median / max and the coefficient of variation (stdev / mean),
then the ratio of spreads (interleaved estimate vs raw) and how far each median moved from the
pruned model's latency measured alone (bias).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils import benchmark

from autoprune.measure import honest_latency_ms, time_model


def make_cnn(c1: int = 16, c2: int = 32) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 8 * 8, 10),
    )


def prune_half_channels(dense: nn.Sequential) -> nn.Sequential:
    """Keep the first half of each conv's output channels (structured pruning by hand)."""
    c1 = dense[0].out_channels // 2
    c2 = dense[2].out_channels // 2
    small = make_cnn(c1, c2)
    with torch.no_grad():
        small[0].weight.copy_(dense[0].weight[:c1])
        small[0].bias.copy_(dense[0].bias[:c1])
        small[2].weight.copy_(dense[2].weight[:c2, :c1])
        small[2].bias.copy_(dense[2].bias[:c2])
        # flatten order is (channel, h, w): keep the columns of the kept channels
        small[5].weight.copy_(dense[5].weight.view(10, -1, 64)[:, :c2].reshape(10, -1))
        small[5].bias.copy_(dense[5].bias)
    return small.eval()


def training_load(stop: mp.synchronize.Event) -> None:
    """A second 'trial': train the same CNN with one thread until told to stop."""
    torch.set_num_threads(1)
    torch.manual_seed(1)
    model = make_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    while not stop.is_set():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def coarse_estimate(pruned: nn.Module, dense: nn.Module, x: torch.Tensor, dense_alone_ms: float) -> float:
    """The first design, kept for comparison: one ``blocked_autorange(0.05 s)`` window per model
    per round, 5 rounds, ratio of the medians of all blocks (same time budget as the default
    ``honest_latency_ms``, which alternates the models block by block instead)."""
    times: dict[str, list[float]] = {"p": [], "d": []}
    timers = {
        k: benchmark.Timer("m(x)", globals={"m": m, "x": x}, num_threads=1)
        for k, m in (("p", pruned), ("d", dense))
    }
    with torch.inference_mode():
        for r in range(5):
            for k in ("p", "d") if r % 2 == 0 else ("d", "p"):
                times[k].extend(timers[k].blocked_autorange(min_run_time=0.05).times)
    return dense_alone_ms * statistics.median(times["p"]) / statistics.median(times["d"])


def summary(values: list[float]) -> tuple[float, float, float, float, float]:
    """min, median, max, coefficient of variation (stdev / mean), relative IQR (IQR / median)."""
    mean = statistics.fmean(values)
    med = statistics.median(values)
    cv = statistics.stdev(values) / mean if len(values) > 1 else 0.0
    if len(values) > 1:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        riqr = (q3 - q1) / med
    else:
        riqr = 0.0
    return min(values), med, max(values), cv, riqr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="measurements per series")
    parser.add_argument("--loads", type=int, nargs="+", default=[1, 2], help="numbers of load processes")
    parser.add_argument("--min-run-time", type=float, default=0.1, help="time_model min_run_time (s)")
    parser.add_argument("--rounds", type=int, default=5, help="honest_latency_ms rounds")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dense = make_cnn().eval()
    pruned = prune_half_channels(dense)
    n = args.repeats
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {mp.cpu_count()} CPUs, 1 thread, {n} repeats per series")
    print(
        f"time_model min_run_time={args.min_run_time}s; "
        f"honest_latency_ms rounds={args.rounds}, 0.05 s/model/round"
    )
    rows: list[tuple[str, int, str, list[float]]] = []
    alone_pruned: dict[int, float] = {}
    dense_alone: dict[int, float] = {}

    print(f"load average before 'alone': {os.getloadavg()[0]:.2f} (other users' jobs count too)")
    for batch in (1, 64):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            assert pruned(x).shape == dense(x).shape
        # (a) alone
        dense_runs = [time_model(dense, x, min_run_time=args.min_run_time).median_ms for _ in range(n)]
        pruned_runs = [time_model(pruned, x, min_run_time=args.min_run_time).median_ms for _ in range(n)]
        # reference latencies: lowest median (as reference_latency_ms), robust to other users' jobs
        dense_alone[batch] = min(dense_runs)
        alone_pruned[batch] = min(pruned_runs)
        rows.append(("alone", batch, "dense raw", dense_runs))
        rows.append(("alone", batch, "pruned raw", pruned_runs))
        est = [
            honest_latency_ms(pruned, dense, x, dense_alone_ms=dense_alone[batch], rounds=args.rounds)[0]
            for _ in range(n)
        ]
        rows.append(("alone", batch, "pruned interleaved est.", est))
        coarse = [coarse_estimate(pruned, dense, x, dense_alone[batch]) for _ in range(n)]
        rows.append(("alone", batch, "pruned coarse est.", coarse))

    for loads in args.loads:
        ctx = mp.get_context("spawn")
        stop = ctx.Event()
        procs = [ctx.Process(target=training_load, args=(stop,), daemon=True) for _ in range(loads)]
        for p in procs:
            p.start()
        time.sleep(2.0)  # let the loads import torch and start training
        print(f"load average with {loads} load process(es): {os.getloadavg()[0]:.2f}")
        try:
            for batch in (1, 64):
                x = torch.randn(batch, 1, 8, 8)
                raw: list[float] = []
                est = []
                coarse = []
                for _ in range(n):  # alternate so all series see the same load
                    raw.append(time_model(pruned, x, min_run_time=args.min_run_time).median_ms)
                    e, _, _ = honest_latency_ms(
                        pruned, dense, x, dense_alone_ms=dense_alone[batch], rounds=args.rounds
                    )
                    est.append(e)
                    coarse.append(coarse_estimate(pruned, dense, x, dense_alone[batch]))
                scenario = f"load x{loads}"
                rows.append((scenario, batch, "pruned raw", raw))
                rows.append((scenario, batch, "pruned interleaved est.", est))
                rows.append((scenario, batch, "pruned coarse est.", coarse))
        finally:
            stop.set()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()

    print()
    header = ("scenario", "batch", "series", "min ms", "median ms", "max ms", "CV %", "IQR/med %")
    print("{:<10} {:>5}  {:<24} {:>9} {:>10} {:>9} {:>7} {:>9}".format(*header))
    for scenario, batch, series, values in rows:
        lo, med, hi, cv, riqr = summary(values)
        print(
            f"{scenario:<10} {batch:>5}  {series:<24} {lo:9.4f} {med:10.4f} {hi:9.4f} "
            f"{100 * cv:7.2f} {100 * riqr:9.2f}"
        )

    print()
    print("Under load: spread and bias of the pruned model's latency (bias: median / lowest median alone)")
    header = (
        "scenario",
        "batch",
        "CV est/raw",
        "IQR est/raw",
        "raw med/alone",
        "est med/alone",
        "CV coarse/raw",
    )
    print("{:<10} {:>5}  {:>10} {:>11} {:>14} {:>14} {:>13}".format(*header))
    by_key = {(s, b, name): v for s, b, name, v in rows}
    for loads in args.loads:
        scenario = f"load x{loads}"
        for batch in (1, 64):
            raw = by_key[(scenario, batch, "pruned raw")]
            est = by_key[(scenario, batch, "pruned interleaved est.")]
            coarse = by_key[(scenario, batch, "pruned coarse est.")]
            cv_ratio = summary(est)[3] / summary(raw)[3]
            iqr_ratio = summary(est)[4] / summary(raw)[4] if summary(raw)[4] > 0 else float("nan")
            raw_bias = statistics.median(raw) / alone_pruned[batch]
            est_bias = statistics.median(est) / alone_pruned[batch]
            print(
                f"{scenario:<10} {batch:>5}  {cv_ratio:10.2f} {iqr_ratio:11.2f} "
                f"{raw_bias:14.3f} {est_bias:14.3f} {summary(coarse)[3] / summary(raw)[3]:13.2f}"
            )
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
