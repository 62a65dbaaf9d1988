"""One-shot LLM pruning baselines against the causal-LM search (issue 11, "Done when" items 2 and 3).

Run:  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled \\
      .venv/bin/python benchmarks/llm_baselines.py [--work-dir DIR] [--n-trials N]

1. Runs ``search_spaces/causal_lm.yaml`` through the Python API (``autoprune.Search``, in-process backend,
   no model logging) in a temporary work dir (or ``--work-dir``): this pre-trains and caches the dense byte-level
   Llama, then runs the search (its own enqueued baselines first, then the searched trials), every trial
   fine-tuned as configured. Then a second study on the same dense model (``model.checkpoint``) and the same
   fine-tuning holds only the baselines, as enqueued trials of a ``per_unit`` space: uniform magnitude / Wanda /
   SparseGPT at 50%, magnitude / Wanda / SparseGPT 2:4, global magnitude 50%, OWL 50% with Wanda; so each
   baseline is also measured fine-tuned at the trials' budget. Trials are selected on the validation text;
   everything below is reported on the **test** text (held-out topics the search never selected on).
2. Without fine-tuning, prunes every candidate ``nn.Linear`` (all decoder projections; ``lm_head`` and the
   embeddings are never candidates) of the dense model with magnitude (``l1_unstructured``), ``wanda``,
   ``sparsegpt`` at a uniform 50%; ``magnitude_2:4``, ``wanda_2:4``, ``sparsegpt_2:4``; and OWL's
   outlier-weighted allocation at a mean of 50% with ``wanda`` (the non-uniform baseline). Two diagnostics
   that are no registered method: magnitude compared per output row (Wanda's comparison group without the
   activation norms) and Wanda's score compared per layer (the activation norms without the row group).
   Calibration batches come from ``autoprune.trial.make_context`` with the search's settings (as a trial gets
   them). Measured: test perplexity (``evaluate_perplexity``), non-zero candidate weights, bytes on disk
   (``autoprune.model_files.model_size_bytes``).
3. Hypervolumes (``optuna._hypervolume.compute_hypervolume``), both axes minimized, reference (2.0, 1.0):
   (test perplexity / reference, bytes on disk / dense bytes) and (test perplexity / reference, latency / dense
   latency as the trials timed it, each against the dense model timed in its own study); the reference is the
   better test perplexity of the dense model and of the dense model fine-tuned with the trials' budget (the
   study's own reference). A point counts only if its perplexity is under twice the reference and it is smaller
   (faster) than dense. The *searched* trials (not the enqueued baselines) are compared with each baseline
   alone, fine-tuned (enqueued trials of either study) and one-shot.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "search_spaces"))

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import autoprune  # noqa: E402
from autoprune import model_files  # noqa: E402
from autoprune.measure import evaluate_perplexity  # noqa: E402
from autoprune.methods.importance import Unit  # noqa: E402
from autoprune.methods.llm import linear_layers, row_lowest  # noqa: E402
from autoprune.methods.wanda import WandaImportance  # noqa: E402
from autoprune.owl import layer_targets, owl_allocation  # noqa: E402
from autoprune.plan import LayerPlan, Plan  # noqa: E402
from autoprune.trial import make_context, prune_model  # noqa: E402

CONFIG = ROOT / "search_spaces" / "causal_lm.yaml"
REF = (2.0, 1.0)  # (perplexity / dense perplexity, bytes or latency / dense)


ONE_SHOT = ("l1_unstructured", "wanda", "sparsegpt", "magnitude_2:4", "wanda_2:4", "sparsegpt_2:4")
BASELINE_STUDY = [  # the baselines alone, fine-tuned: enqueued trials of a per-unit study (8 of them)
    "study.name=causal-lm-baselines", "study.n_trials=8", "study.baselines=[0.5]",
    "study.baseline_rules=[uniform, global_magnitude, owl]", f"study.baseline_methods=[{', '.join(ONE_SHOT)}]",
    "space.parametrization=per_unit", f"space.methods=[{', '.join(ONE_SHOT)}]",
    "space.sparsity={low: 0.0, high: 0.9, step: 0.1}", "model.pretrain=null",
]


def nonzero_linear(model: nn.Module, names: set[str]) -> int:
    """Non-zero weights (and biases) of the Linear layers of ``model`` named in ``names``."""
    total = 0
    for name, module in model.named_modules():
        if name in names and isinstance(module, nn.Linear):
            total += int(torch.count_nonzero(module.weight))
            if module.bias is not None:
                total += int(torch.count_nonzero(module.bias))
    return total


def hypervolume(points: list[tuple[float, float]]) -> float:
    from optuna._hypervolume import compute_hypervolume

    inside = [p for p in points if p[0] < REF[0] and p[1] < REF[1]]
    if not inside:
        return 0.0
    return float(compute_hypervolume(np.array(inside, dtype=float), np.array(REF, dtype=float)))


def label(method: str) -> str:
    name = "magnitude" if method == "l1_unstructured" else method
    return name if ":" in method else f"{name} 50%"


def diagnostic(dense: nn.Module, names: list[str], context: object, per_row_magnitude: bool) -> nn.Module:
    """Magnitude compared per output row, or Wanda's score compared per layer, at 50% of every layer."""
    model = copy.deepcopy(dense)
    layers = {name: model.get_submodule(name) for name in names}
    importance = WandaImportance()
    if not per_row_magnitude:
        importance.prepare(model, [Unit.weights(n, layer) for n, layer in layers.items()], context)
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.weight
            count = round(0.5 * weight.numel())
            if per_row_magnitude:
                drop = row_lowest(weight.abs(), count)
            else:
                score = importance.scores(Unit.weights(name, layer), context).flatten()
                drop = torch.zeros_like(score, dtype=torch.bool)
                drop[torch.argsort(score, stable=True)[:count]] = True
                drop = drop.reshape(weight.shape)
            weight.mul_((~drop).to(weight.dtype))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--n-trials", type=int, default=None, help="default: the YAML's study.n_trials")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the search, as 'autoprune run --set' takes (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="llm-baselines-") as tmp:
        run(args.work_dir or Path(tmp), args.n_trials, args.set)


def run(work_dir: Path, n_trials: int | None, overrides: list[str]) -> None:
    start = time.perf_counter()
    search = autoprune.Search(CONFIG, overrides=[f"work_dir={work_dir}", "execution.backend=in_process",
                                                 "tracking.log_models=false", *overrides])
    summary = search.run(n_trials)
    search_s = time.perf_counter() - start
    t0 = time.perf_counter()
    baseline_search = autoprune.Search(CONFIG, overrides=[
        f"work_dir={work_dir}", "execution.backend=in_process", "tracking.log_models=false", *overrides,
        *BASELINE_STUDY, f"model.checkpoint={search.config.dense_path}"])
    baseline_summary = baseline_search.run()
    print(f"baselines study ({baseline_summary.completed} complete / {baseline_summary.failed} failed trials, "
          f"fine-tuned like the search's): {time.perf_counter() - t0:.0f} s")
    dense_info = summary.dense
    print(f"search (pre-training + {summary.completed} complete / {summary.failed} failed trials): "
          f"{search_s:.0f} s; work dir {work_dir}")
    print(f"dense: validation ppl {dense_info.accuracy:.4f}, test ppl {dense_info.test_accuracy:.4f}; fine-tuned "
          f"with the trials' budget: validation {dense_info.finetuned_accuracy}, test "
          f"{dense_info.finetuned_test_accuracy}; {dense_info.size_bytes:,} bytes; {dense_info.latency_ms:.3f} ms "
          f"(batch {dense_info.latency_batch}, {dense_info.latency_device})")

    workspace = search._workspace
    inputs = workspace.inputs
    dense = workspace.dense()
    settings = inputs.settings
    test = inputs.test_loader
    names = list(linear_layers(dense, settings.protected))
    name_set = set(names)
    dense_nz = nonzero_linear(dense, name_set)
    all_linear = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)]
    print(f"candidate Linear layers: {len(names)} of {len(all_linear)} (not candidates: "
          f"{', '.join(sorted(set(all_linear) - name_set))}); {dense_nz:,} weights; "
          f"model {sum(p.numel() for p in dense.parameters()):,} parameters")

    example = next(iter(inputs.val_loader))[0][:1]
    context = make_context(inputs.train_loader, settings, example)
    tokens = sum(int(x.numel()) for x, _ in context.calibration_batches)
    print(f"calibration: {len(context.calibration_batches)} training batches ({tokens:,} tokens), as a trial gets")

    dense_ppl = evaluate_perplexity(dense, test)
    reference = min(dense_ppl, dense_info.finetuned_test_accuracy or dense_ppl)
    print(f"perplexities below are relative to {reference:.4f}: the better of the dense model and the dense model "
          "fine-tuned with the trials' budget (the study's own reference for a drop)")
    dense_bytes = model_files.model_size_bytes(dense)
    rows: list[dict[str, object]] = [{"name": "dense", "ppl": dense_ppl, "nz": dense_nz, "bytes": dense_bytes,
                                      "s": 0.0, "kind": "dense"}]
    plans = {label(m): Plan(tuple(LayerPlan(n, m, 0.5) for n in names)) for m in ONE_SHOT}
    allocation = owl_allocation(dense, context.calibration_batches, 0.5, protected=settings.protected)
    targets = layer_targets(dense, allocation, settings.protected)
    print("OWL allocation (M=5, lambda=0.08): "
          + ", ".join(f"{block.rsplit('.', 1)[-1]}={s:.3f}" for block, s in allocation.items()))
    plans["OWL 50% + wanda"] = Plan(tuple(LayerPlan(n, "wanda", targets[n]) for n in names))
    for name, plan in plans.items():
        t0 = time.perf_counter()
        torch.manual_seed(0)
        pruned = prune_model(dense, plan, copy.deepcopy(context))
        rows.append({"name": name, "model": pruned, "s": time.perf_counter() - t0, "kind": "baseline"})
    for name, per_row in (("diagnostic: magnitude per output row 50%", True),
                          ("diagnostic: Wanda score per layer 50%", False)):
        t0 = time.perf_counter()
        rows.append({"name": name, "model": diagnostic(dense, names, copy.deepcopy(context), per_row),
                     "s": time.perf_counter() - t0, "kind": "diagnostic"})
    for row in rows[1:]:
        model = row.pop("model")
        row.update(ppl=evaluate_perplexity(model, test), nz=nonzero_linear(model, name_set),
                   bytes=model_files.model_size_bytes(model))

    print("\n### One-shot (no fine-tuning), test text\n")
    print("| model | test ppl | ppl / reference | non-zero candidate weights | fraction | bytes on disk "
          "| bytes / dense | prune s | HV (ppl, bytes) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        rel, frac = float(row["ppl"]) / reference, int(row["nz"]) / dense_nz
        row["point"] = (rel, int(row["bytes"]) / dense_bytes)
        row["hv"] = hypervolume([row["point"]])
        print(f"| {row['name']} | {row['ppl']:.4f} | {rel:.3f} | {row['nz']:,} | {frac:.3f} | {row['bytes']:,} | "
              f"{row['point'][1]:.3f} | {row['s']:.1f} | {row['hv']:.4f} |")

    # ---- the search's trials, on the test text ----
    sources = [(search, r) for r in search.trials()] + [
        (baseline_search, replace(r, baseline=f"{r.baseline} (baselines study)")) for r in baseline_search.trials()]
    trials = [r for _, r in sources]
    records = [r for r in trials if r.state == "COMPLETE"]
    owner = {id(r): source for source, r in sources}
    # latency relative to the dense model timed in the same study (two studies, two timing sessions)
    own_dense_ms = {id(search): dense_info.latency_ms, id(baseline_search): baseline_summary.dense.latency_ms}
    failed = [r for r in trials if r.state != "COMPLETE"]
    search_rows = []
    for record in records:
        model = owner[id(record)].load_model(record.trial)
        search_rows.append({
            "trial": record.trial, "baseline": record.baseline, "val": record.accuracy, "ppl": record.test_accuracy,
            "nz": nonzero_linear(model, name_set), "bytes": record.size_bytes, "latency": record.latency_ms,
            "on_front": record.on_front,
            "size_point": (record.test_accuracy / reference, record.size_bytes / dense_bytes),
            "latency_point": (record.test_accuracy / reference,
                              record.latency_ms / own_dense_ms[id(owner[id(record)])])})
    print(f"\n### Search trials (fine-tuned: finetune of {CONFIG.name}); {len(records)} complete, "
          f"{len(failed)} not\n")
    print("| trial | enqueued baseline | validation ppl | test ppl | test ppl / reference | non-zero fraction | "
          "bytes / dense | latency / dense | on 3-D front (validation) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in sorted(search_rows, key=lambda r: r["size_point"][1]):
        print(f"| {row['trial']} | {row['baseline'] or '-'} | {row['val']:.3f} | {row['ppl']:.3f} | "
              f"{row['size_point'][0]:.3f} | {row['nz'] / dense_nz:.3f} | {row['size_point'][1]:.3f} | "
              f"{row['latency_point'][1]:.3f} | {'yes' if row['on_front'] else ''} |")
    for record in failed:
        print(f"- trial {record.trial}: {record.state} {record.fail_reason or ''}")

    searched = [r for r in search_rows if not r["baseline"]]
    enqueued = [r for r in search_rows if r["baseline"]]
    oneshot = [r for r in rows if r["kind"] == "baseline"]
    print(f"\n### Hypervolume on the test text (reference {REF}; both axes relative to dense, minimized)\n")
    print("| points | HV (ppl, bytes) | searched / it | HV (ppl, latency) | searched / it |")
    print("|---|---|---|---|---|")
    hv_size = hypervolume([r["size_point"] for r in searched])
    hv_lat = hypervolume([r["latency_point"] for r in searched])
    print(f"| searched trials only ({len(searched)}) | {hv_size:.4f} | | {hv_lat:.4f} | |")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "inf"

    results = []
    for row in enqueued:
        size, lat = hypervolume([row["size_point"]]), hypervolume([row["latency_point"]])
        results.append((f"{row['baseline']}, fine-tuned", size))
        print(f"| {row['baseline']}, fine-tuned | {size:.4f} | {ratio(hv_size, size)} | {lat:.4f} | "
              f"{ratio(hv_lat, lat)} |")
    union = hypervolume([r["size_point"] for r in enqueued])
    union_lat = hypervolume([r["latency_point"] for r in enqueued])
    print(f"| union of the enqueued baselines | {union:.4f} | {ratio(hv_size, union)} | {union_lat:.4f} | "
          f"{ratio(hv_lat, union_lat)} |")
    for row in oneshot:
        results.append((f"{row['name']}, one-shot", row["hv"]))
        print(f"| {row['name']} (one-shot; latency as dense) | {row['hv']:.4f} | {ratio(hv_size, row['hv'])} | | |")
    everything = hypervolume([r["size_point"] for r in search_rows])
    print(f"| all trials of both studies | {everything:.4f} | | "
          f"{hypervolume([r['latency_point'] for r in search_rows]):.4f} | |")

    by = {r["name"]: r["ppl"] for r in rows}
    mag = by[label("l1_unstructured")]
    print("\n### Checks\n")
    for method in ("wanda", "sparsegpt"):
        verdict = "lower" if by[label(method)] < mag else "NOT lower"
        print(f"- {label(method)} one-shot: test ppl {by[label(method)]:.3f} vs magnitude 50% {mag:.3f}: {verdict}")
    beaten = [name for name, hv in results if hv_size <= hv]
    print(f"- searched trials' HV (ppl, bytes) {hv_size:.4f} beats every single baseline: {not beaten}"
          + (f" (not: {', '.join(beaten)})" if beaten else ""))
    print(f"\ntotal {time.perf_counter() - start:.0f} s (search {search_s:.0f} s)")


if __name__ == "__main__":
    main()
