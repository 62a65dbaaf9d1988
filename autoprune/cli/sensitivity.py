"""``autoprune sensitivity``: accuracy against sparsity, one unit at a time, before a search."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._app import ConfigArg, SetOpt, _search_api, _user_errors, app, out


# ---- sensitivity ----
def _ratios_option(value: str) -> str:
    from ..sensitivity import parse_ratios

    try:
        parse_ratios(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


@app.command()
def sensitivity(
    config: ConfigArg,
    set_: SetOpt = None,
    ratios: Annotated[str, typer.Option(
        "--ratios", callback=_ratios_option,
        help="Sparsities to measure for each unit, comma-separated, each in [0, 1) and at most "
             "space.max_layer_sparsity (0, the dense reference, is always measured).")] = "0.25,0.5,0.75,0.9",
    max_drop: Annotated[float, typer.Option(
        "--max-drop", min=0.0, max=0.99,
        help="Tolerated accuracy drop (fraction, 0.05 = 5 points) that sets each unit's bound; with "
             "model.task causal_lm, the tolerated relative perplexity increase (0.05 = 5% higher).")] = 0.05,
    methods: Annotated[list[str] | None, typer.Option(
        "--method", "-m", help="Measure only this method of space.methods (repeatable); default: every one.")] = None,
) -> None:
    """Accuracy against sparsity per unit and method, one unit pruned at a time, WITHOUT fine-tuning.

    Runs in this process on the dense model (no Ray). Writes <work_dir>/sensitivity.json, logs a plot and
    the JSON on the study's MLflow parent run, and prints each unit's bound: the largest sparsity whose
    accuracy drop is at most --max-drop. The next NEW study in this work dir evaluates two trials built
    from the bounds first (every unit at its bound, then at half of it). With model.task causal_lm it
    measures validation perplexity, and the bound is the largest sparsity whose perplexity is at most
    (1 + --max-drop) times the dense model's.
    """
    with _user_errors():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ..sensitivity import parse_ratios

        search = _search_api(config, set_)
        cfg = search.config
        with Progress(TextColumn("[bold]sensitivity"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[status]}"), console=out, transient=True) as bar:
            task = bar.add_task("sensitivity", total=None, status="building the model and data")

            def on_progress(p) -> None:
                bar.update(task, total=p.total, completed=p.done, status=p.message)

            result = search.sensitivity(parse_ratios(ratios), max_drop=max_drop, methods=methods or None,
                                        progress=on_progress)
        _print_sensitivity(cfg, config, result)


def _print_sensitivity(cfg, config_path: Path, result) -> None:
    from ..retry import safe_url

    if result.metric == "perplexity":  # a drop is a relative perplexity increase (autoprune.sensitivity)
        quality, drop = "Perplexity", f"perplexity increase <= {result.max_drop:.0%}"
    else:
        quality, drop = "Accuracy", f"drop <= {result.max_drop:g}"
    table = Table(title=f"{quality} without fine-tuning, one unit pruned at a time (dense {result.dense_accuracy:.4f});"
                        f" bound = largest sparsity with {drop}")
    table.add_column("unit")
    table.add_column("method")
    for ratio in result.ratios:
        table.add_column(f"{ratio:g}", justify="right")
    table.add_column("bound", justify="right")
    for curve in result.curves:
        by_ratio = {p.ratio: ("failed" if p.accuracy is None else f"{p.accuracy:.4f}") for p in curve.points}
        if curve.family == "removal":
            cells = [by_ratio.get(0.0, ""), *[""] * (len(result.ratios) - 1)]
            bound = "remove" if curve.bound >= 1 else "keep"
            table.add_row(curve.unit, f"{curve.method} (removed: {by_ratio.get(1.0, '')})", *cells, bound)
        else:
            table.add_row(curve.unit, curve.method, *[by_ratio.get(r, "") for r in result.ratios], f"{curve.bound:g}")
    out.print(table)
    failed = [(c.unit, c.method, p.ratio, p.error) for c in result.curves for p in c.points if p.error]
    for unit, method, ratio, error in failed[:10]:
        out.print(f"  failed: {unit} {method} {ratio:g}: {error}", highlight=False)
    out.print(f"wrote {result.path} in {result.seconds:.1f} s", highlight=False)
    if result.parent_run_id:
        out.print(f"MLflow: artifacts sensitivity/sensitivity.png and sensitivity/sensitivity.json on the parent "
                  f"run {result.parent_run_id} of study {cfg.study.name!r} in {safe_url(cfg.tracking_uri)}",
                  highlight=False)
    seeds = "\n".join(f"  {i}. {label}: {_seed_text(params)}" for i, (label, params) in enumerate(result.seeds, 1))
    if result.study_exists:
        out.print(f"next: study {cfg.study.name!r} already exists, and 'autoprune resume' ignores sensitivity.json. "
                  f"A NEW study in this work dir (autoprune run {config_path} --set study.name=NEW) evaluates "
                  f"these trials first:\n{seeds}", highlight=False)
    else:
        out.print(f"next: 'autoprune run {config_path}' creates study {cfg.study.name!r} and evaluates these "
                  f"trials first (before study.baselines; values clipped to that run's space.sparsity range), "
                  f"then samples as usual:\n{seeds}", highlight=False)


def _seed_text(params: dict[str, object]) -> str:
    parts = []
    for name, value in params.items():
        unit, _, key = name.rpartition("/")
        if key == "remove":
            parts.append(f"{unit} {'removed' if value else 'kept'}")
        elif key == "sparsity":
            method = params.get(f"{unit}/method")
            parts.append(f"{unit} {value:g}" + (f" {method}" if method else ""))
        elif not unit:
            parts.append(f"{name}={value}")
    return ", ".join(parts)


