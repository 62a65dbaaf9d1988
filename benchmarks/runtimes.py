"""Does the latency ranking of pruned models hold outside eager PyTorch? (issue 10, item 2)

Run:  .venv/bin/python benchmarks/runtimes.py [--models digits mnist minilm] [--no-compiled] [--quick]

For the demo CNN (``search_spaces/digits_demo.py``, batch 1), the MNIST CNN (``search_spaces/mnist_demo.py``,
batch 1) and all-MiniLM-L6-v2 (``search_spaces/minilm_demo.py``, batch 8 sentences of 20 tokens, as in
``minilm_sentences.yaml``), a handful of plans is applied with ``autoprune.trial.prune_model``: uniform
structured at 25/50/75 % (CNNs: ``l1_structured`` channels; MiniLM: ``attention_heads`` and ``mlp_neurons``),
unstructured at 50/90 % (``l1_unstructured``) and two mixed plans. Each pruned model is timed against the dense
model in each runtime -- eager, ONNX Runtime (the model exported with ``torch.onnx.export(..., dynamo=True)``)
and ``torch.compile`` (CNNs only: compiling MiniLM eight times does not fit the time budget) -- exactly as a
trial does (``measure.runtime_model`` + ``measure.time_interleaved``, 1 thread): the ratio pruned/dense within
one interleaved window, scaled by the dense model's own latency in that runtime (lowest of 3 medians).

No fine-tuning and (CNNs) no pre-training: latency depends on shapes (structured) and on the kernels run,
not on the values of the weights; zeros of unstructured plans are real zeros in dense tensors.

Printed per model: one row per plan (ms per runtime, speed-up = dense / pruned within each runtime), the
ranking (fastest first) per runtime, Spearman's rank correlation of the plans' latencies between eager and
each other runtime, and the load average (the machine is shared: ratios are what to read).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "search_spaces"))
sys.path.insert(0, str(ROOT))

from autoprune import measure  # noqa: E402
from autoprune.methods import PruneContext, get_method  # noqa: E402
from autoprune.plan import LayerPlan, Plan  # noqa: E402
from autoprune.space import find_head  # noqa: E402
from autoprune.trial import prune_model  # noqa: E402


@dataclass
class Case:
    name: str
    make: Callable[[], tuple[nn.Module, torch.Tensor, str]]  # model, latency inputs, protected head
    structured: tuple[str, ...]
    runtimes: tuple[str, ...]


@dataclass
class Row:
    plan: str
    params: int
    ms: dict[str, float] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)
    error: dict[str, str] = field(default_factory=dict)


def _digits() -> tuple[nn.Module, torch.Tensor, str]:
    import digits_demo

    model = digits_demo.make_model()
    return model, torch.rand(1, 1, 8, 8), find_head(model)


def _mnist() -> tuple[nn.Module, torch.Tensor, str]:
    import mnist_demo

    model = mnist_demo.make_model()
    return model, torch.rand(1, 1, 28, 28), find_head(model)


def _minilm() -> tuple[nn.Module, torch.Tensor, str]:
    import minilm_demo

    ids = minilm_demo.tokenize(minilm_demo.load_sentences()[:8])
    return minilm_demo.make_model(), ids, "bert.embeddings"


def plans(model: nn.Module, context: PruneContext, structured: tuple[str, ...]) -> dict[str, Plan]:
    """Uniform structured 25/50/75 %, unstructured 50/90 %, and two mixed plans."""
    units = {m: get_method(m).candidates(model, context) for m in (*structured, "l1_unstructured")}

    def uniform(methods: tuple[str, ...], ratio: float) -> Plan:
        return Plan(tuple(LayerPlan(u, m, ratio) for m in methods for u in units[m]))

    out = {f"struct {r:.0%}": uniform(structured, r) for r in (0.25, 0.5, 0.75)}
    out.update({f"unstruct {r:.0%}": uniform(("l1_unstructured",), r) for r in (0.5, 0.9)})
    if len(structured) == 2:  # MiniLM: heads and neurons cut unevenly
        heads, neurons = structured
        out["mixed heads75/mlp25"] = Plan((*(LayerPlan(u, heads, 0.75) for u in units[heads]),
                                           *(LayerPlan(u, neurons, 0.25) for u in units[neurons])))
        out["mixed heads25/mlp75"] = Plan((*(LayerPlan(u, heads, 0.25) for u in units[heads]),
                                           *(LayerPlan(u, neurons, 0.75) for u in units[neurons])))
    else:  # CNNs: the first half of the channel groups structured, the rest unstructured / less pruned
        method = structured[0]
        first, rest = units[method][: len(units[method]) // 2], units[method][len(units[method]) // 2:]
        masked = [u for u in units["l1_unstructured"] if u not in first]
        out["mixed s50+u90"] = Plan((*(LayerPlan(u, method, 0.5) for u in first),
                                     *(LayerPlan(u, "l1_unstructured", 0.9) for u in masked)))
        out["mixed s75/s25"] = Plan((*(LayerPlan(u, method, 0.75) for u in first),
                                     *(LayerPlan(u, method, 0.25) for u in rest)))
    return out


def run_case(case: Case, args: argparse.Namespace) -> list[Row]:
    torch.manual_seed(0)
    dense, x, head = case.make()
    dense.eval()
    context = PruneContext(example_inputs=x, protected=frozenset({head}), max_layer_sparsity=0.95)
    models = {"dense": dense}
    for label, plan in plans(dense, context, case.structured).items():
        models[label] = prune_model(dense, plan, context).eval()
    rows = {label: Row(label, measure.count_parameters(m)[1]) for label, m in models.items()}
    for runtime in case.runtimes:
        started = time.perf_counter()
        try:
            reference = measure.reference_latency_ms(dense, x, repeats=3, min_run_time=args.min_run_time,
                                                     runtime=runtime)
        except Exception as exc:  # e.g. no C++ compiler for torch.compile
            for row in rows.values():
                row.error[runtime] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            continue
        rows["dense"].ms[runtime], rows["dense"].speedup[runtime] = reference, 1.0
        # one ONNX Runtime session of the dense model for all plans; compiled models are made pair by pair
        # (runtime_model clears dynamo's caches, so that nine compiled variants never reach its recompile limit)
        shared = measure.runtime_model(dense, x, runtime) if runtime == "onnxruntime" else None
        for label, model in models.items():
            if label == "dense":
                continue
            try:
                pruned = measure.runtime_model(model, x, runtime)
                reference_model = shared if shared is not None else measure.runtime_model(dense, x, runtime)
                samples = measure.time_interleaved({"pruned": pruned, "dense": reference_model}, x,
                                                   rounds=args.rounds, min_run_time=args.min_run_time)
            except Exception as exc:
                rows[label].error[runtime] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                continue
            ratio = samples["pruned"].median_ms / samples["dense"].median_ms
            rows[label].ms[runtime], rows[label].speedup[runtime] = reference * ratio, 1 / ratio
        print(f"  [{case.name}] {runtime}: {time.perf_counter() - started:.0f} s", flush=True)
    return list(rows.values())


def report(case: Case, rows: list[Row]) -> str:
    runtimes = case.runtimes
    lines = [f"### {case.name}", "",
             "| plan | non-zero params | " + " | ".join(f"{r} ms" for r in runtimes) + " | "
             + " | ".join(f"speed-up {r}" for r in runtimes) + " |",
             "|---" * (2 + 2 * len(runtimes)) + "|"]
    for row in rows:
        ms = [f"{row.ms[r]:.4f}" if r in row.ms else "failed" for r in runtimes]
        sp = [f"{row.speedup[r]:.2f}x" if r in row.speedup else "-" for r in runtimes]
        lines.append(f"| {row.plan} | {row.params:,} | " + " | ".join(ms + sp) + " |")
    lines.append("")
    pruned = [row for row in rows if row.plan != "dense"]
    for runtime in runtimes:
        ranked = sorted((row for row in pruned if runtime in row.ms), key=lambda row: row.ms[runtime])
        lines.append(f"- ranking ({runtime}, fastest first): " + ", ".join(row.plan for row in ranked))
    for runtime in runtimes[1:]:
        both = [row for row in pruned if "eager" in row.ms and runtime in row.ms]
        if len(both) >= 3:
            rho = spearmanr([row.ms["eager"] for row in both], [row.ms[runtime] for row in both]).statistic
            lines.append(f"- Spearman rank correlation eager vs {runtime}: {rho:.2f} ({len(both)} plans)")
    for row in rows:
        for runtime, error in row.error.items():
            lines.append(f"- {row.plan} in {runtime}: failed ({error})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "mnist", "minilm"],
                        choices=["digits", "mnist", "minilm"])
    parser.add_argument("--no-compiled", action="store_true", help="skip torch.compile")
    parser.add_argument("--quick", action="store_true", help="shorter timing windows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.05)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.min_run_time = 2, 0.02
    torch.set_num_threads(1)
    compiled = () if args.no_compiled else ("compiled",)
    cases = {
        "digits": Case("digits CNN (digits_demo, batch 1)", _digits, ("l1_structured",),
                       ("eager", "onnxruntime", *compiled)),
        "mnist": Case("MNIST CNN (mnist_demo, batch 1)", _mnist, ("l1_structured",),
                      ("eager", "onnxruntime", *compiled)),
        "minilm": Case("MiniLM (minilm_demo, batch 8 x 20 tokens)", _minilm, ("attention_heads", "mlp_neurons"),
                       ("eager", "onnxruntime")),
    }
    print(f"torch {torch.__version__}, 1 thread, rounds {args.rounds}, min_run_time {args.min_run_time} s; "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    started = time.perf_counter()
    outputs = []
    for name in args.models:
        case = cases[name]
        rows = run_case(case, args)
        outputs.append(report(case, rows))
        print(outputs[-1] + "\n", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
