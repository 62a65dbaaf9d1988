"""One-shot LLM pruning baselines against the causal-LM search (issue 11, "Done when" items 2 and 3).

Run:  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled \\
      .venv/bin/python benchmarks/llm_baselines.py [--work-dir DIR] [--n-trials N]

1. Runs ``search_spaces/causal_lm.yaml`` through the Python API (``autoprune.Search``, in-process backend,
   no model logging) in a temporary work dir (or ``--work-dir``): this pre-trains and caches the dense byte-level
   Llama, then runs the search (trials fine-tuned as configured). The dense model, loaders and trial settings
   of that same search are reused below.
2. Without fine-tuning, prunes every candidate ``nn.Linear`` (all decoder projections; ``lm_head`` and the
   embeddings are never candidates) of the dense model with: ``l1_unstructured`` (magnitude), ``wanda``,
   ``sparsegpt`` at a uniform 50%; ``wanda_2:4``, ``sparsegpt_2:4`` (no magnitude 2:4 method is registered, so
   that row is skipped); and OWL's outlier-weighted allocation at a mean of 50% with ``wanda`` (the non-uniform
   baseline). Calibration batches come from ``autoprune.trial.make_context`` with the search's settings (as a
   trial gets them). Measured: held-out perplexity (``evaluate_perplexity`` on the validation loader), non-zero
   weights of the candidate Linear layers (and their fraction of the dense ones), and bytes on disk
   (``autoprune.model_files.model_size_bytes``).
3. Hypervolume on (perplexity / dense perplexity, non-zero candidate-weight fraction), both minimized,
   reference point (2.0, 1.0): a point counts only if its perplexity is under twice the dense one and it keeps
   fewer weights than dense. ``optuna._hypervolume.compute_hypervolume``. For the search's trials the fraction is
   counted on their saved (pruned, fine-tuned) models, over the same Linear layers (removed ones count zero).
   The search's trials are fine-tuned (``finetune`` of the YAML); the one-shot baselines are not. The search's
   own enqueued baselines (user attr ``autoprune.baseline``: uniform rules at 50%, fine-tuned like every trial)
   are listed too.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
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
from autoprune.methods.llm import linear_layers  # noqa: E402
from autoprune.owl import layer_targets, owl_allocation  # noqa: E402
from autoprune.plan import LayerPlan, Plan  # noqa: E402
from autoprune.study import BASELINE_ATTR  # noqa: E402
from autoprune.trial import make_context, prune_model  # noqa: E402

CONFIG = ROOT / "search_spaces" / "causal_lm.yaml"
REF = (2.0, 1.0)  # (perplexity / dense perplexity, non-zero fraction)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--n-trials", type=int, default=None, help="default: the YAML's study.n_trials")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="llm-baselines-") as tmp:
        run(args.work_dir or Path(tmp), args.n_trials)


def run(work_dir: Path, n_trials: int | None) -> None:
    start = time.perf_counter()
    search = autoprune.Search(CONFIG, overrides=[f"work_dir={work_dir}", "execution.backend=in_process",
                                                 "tracking.log_models=false"])
    summary = search.run(n_trials)
    search_s = time.perf_counter() - start
    print(f"search (pre-training + {summary.completed} complete / {summary.failed} failed trials): "
          f"{search_s:.0f} s; dense held-out ppl {summary.dense}; work dir {work_dir}")

    workspace = search._workspace
    inputs = workspace.inputs
    dense = workspace.dense()
    settings = inputs.settings
    val = inputs.val_loader
    names = list(linear_layers(dense, settings.protected))
    name_set = set(names)
    dense_nz = nonzero_linear(dense, name_set)
    all_linear = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)]
    print(f"candidate Linear layers: {len(names)} of {len(all_linear)} (not candidates: "
          f"{', '.join(sorted(set(all_linear) - name_set))}); {dense_nz:,} weights; "
          f"model {sum(p.numel() for p in dense.parameters()):,} parameters")

    example = next(iter(val))[0][:1]
    context = make_context(inputs.train_loader, settings, example)
    tokens = sum(int(x.numel()) for x, _ in context.calibration_batches)
    print(f"calibration: {len(context.calibration_batches)} training batches ({tokens:,} tokens), as a trial gets")

    t0 = time.perf_counter()
    dense_ppl = evaluate_perplexity(dense, val)
    rows: list[dict[str, object]] = [{"name": "dense", "ppl": dense_ppl, "nz": dense_nz,
                                      "bytes": model_files.model_size_bytes(dense), "s": time.perf_counter() - t0}]

    plans: dict[str, Plan] = {}
    for method in ("l1_unstructured", "wanda", "sparsegpt", "wanda_2:4", "sparsegpt_2:4"):
        label = "magnitude (l1_unstructured)" if method == "l1_unstructured" else method
        label += " 50%" if ":" not in method else ""
        plans[label] = Plan(tuple(LayerPlan(n, method, 0.5) for n in names))
    allocation = owl_allocation(dense, context.calibration_batches, 0.5, protected=settings.protected)
    targets = layer_targets(dense, allocation, settings.protected)
    print("OWL allocation (M=5, lambda=0.08): "
          + ", ".join(f"{block.rsplit('.', 1)[-1]}={s:.3f}" for block, s in allocation.items()))
    plans["OWL 50% + wanda"] = Plan(tuple(LayerPlan(n, "wanda", targets[n]) for n in names))

    for label, plan in plans.items():
        t0 = time.perf_counter()
        torch.manual_seed(0)
        pruned = prune_model(dense, plan, copy.deepcopy(context))
        elapsed = time.perf_counter() - t0
        rows.append({"name": label, "ppl": evaluate_perplexity(pruned, val), "nz": nonzero_linear(pruned, name_set),
                     "bytes": model_files.model_size_bytes(pruned), "s": elapsed})
    print("magnitude 2:4: skipped (no magnitude N:M method is registered: "
          "l1_unstructured has no N:M variant; only wanda_N:M and sparsegpt_N:M)")

    print("\n### One-shot (no fine-tuning)\n")
    print("| model | held-out ppl | ppl / dense | non-zero candidate weights | fraction | bytes on disk | prune s "
          "| HV |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        rel, frac = float(row["ppl"]) / dense_ppl, int(row["nz"]) / dense_nz
        row["point"] = (rel, frac)
        row["hv"] = hypervolume([(rel, frac)])
        print(f"| {row['name']} | {row['ppl']:.4f} | {rel:.3f} | {row['nz']:,} | {frac:.3f} | {row['bytes']:,} | "
              f"{row['s']:.1f} | {row['hv']:.4f} |")

    # ---- the search's trials ----
    study = search.study
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    records = [r for r in search.trials() if r.state == "COMPLETE"]
    search_rows = []
    for record in records:
        model = search.load_model(record.trial)
        nz = nonzero_linear(model, name_set)
        search_rows.append({"trial": record.trial, "ppl": record.accuracy, "nz": nz, "bytes": record.size_bytes,
                            "baseline": trials[record.trial].user_attrs.get(BASELINE_ATTR),
                            "on_front": record.on_front, "plan": record.plan,
                            "point": (record.accuracy / dense_ppl, nz / dense_nz)})
    failed = [r for r in search.trials() if r.state != "COMPLETE"]
    print(f"\n### Search trials (fine-tuned: finetune of {CONFIG.name}); {len(records)} complete, "
          f"{len(failed)} not\n")
    print("| trial | enqueued baseline | held-out ppl | ppl / dense | non-zero candidate weights | fraction | "
          "bytes on disk | on 3-D front | 2-D HV |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in sorted(search_rows, key=lambda r: r["point"][1]):
        rel, frac = row["point"]
        print(f"| {row['trial']} | {row['baseline'] or '-'} | {row['ppl']:.3f} | {rel:.3f} | {row['nz']:,} | "
              f"{frac:.3f} | {row['bytes']:,} | {'yes' if row['on_front'] else ''} | "
              f"{hypervolume([row['point']]):.4f} |")
    for record in failed:
        print(f"- trial {record.trial}: {record.state} {record.fail_reason or ''}")

    search_pts = [r["point"] for r in search_rows]
    searched_pts = [r["point"] for r in search_rows if not r["baseline"]]
    oneshot = [r for r in rows if r["name"] != "dense"]
    hv_search = hypervolume(search_pts)
    hv_searched = hypervolume(searched_pts)
    hv_union = hypervolume([r["point"] for r in oneshot])
    print(f"\n### Hypervolume (ppl/dense and non-zero fraction minimized, reference {REF})\n")
    print(f"- search, all {len(search_pts)} complete trials (incl. its enqueued fine-tuned baselines): {hv_search:.4f}")
    print(f"- search, sampled trials only ({len(searched_pts)}): {hv_searched:.4f}")
    for row in oneshot:
        ratio = hv_search / row["hv"] if row["hv"] else float("inf")
        print(f"- {row['name']} (one-shot, one point): {row['hv']:.4f}; search / it = {ratio:.2f}x")
    print(f"- union of the one-shot baselines: {hv_union:.4f}; search / union = "
          f"{(hv_search / hv_union if hv_union else float('inf')):.2f}x")
    ft_dense = summary.dense.finetuned_accuracy
    if ft_dense:
        strict = [(r["ppl"] / ft_dense, r["point"][1]) for r in search_rows]
        print(f"- stricter: search trials relative to the dense model fine-tuned with the same budget (ppl "
              f"{ft_dense:.3f}, the search's own reference) instead of the pre-trained dense ({dense_ppl:.3f}): "
              f"{hypervolume(strict):.4f}; / best one-shot ({max(r['hv'] for r in oneshot):.4f}) = "
              f"{hypervolume(strict) / max(r['hv'] for r in oneshot):.2f}x")
    hv_both = hypervolume(search_pts + [r["point"] for r in oneshot])
    print(f"- search + one-shot baselines together: {hv_both:.4f} "
          f"(one-shot points add {hv_both - hv_search:.4f})")

    by = {r["name"]: r["ppl"] for r in rows}
    mag = by["magnitude (l1_unstructured) 50%"]
    print("\n### Checks\n")
    for name in ("wanda 50%", "sparsegpt 50%"):
        verdict = "lower" if by[name] < mag else "NOT lower"
        print(f"- {name}: ppl {by[name]:.3f} vs magnitude 50% {mag:.3f}: {verdict}")
    beats = all(hv_search > r["hv"] for r in oneshot)
    print(f"- search HV {hv_search:.4f} beats every uniform one-shot baseline's HV: {beats}; "
          f"beats their union ({hv_union:.4f}): {hv_search > hv_union}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s (search {search_s:.0f} s)")


if __name__ == "__main__":
    main()
