"""``autoprune run``, ``resume``, ``front`` and ``export``: thin shells over :class:`autoprune.Search`."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._app import (
    ConfigArg,
    DebugOpt,
    SetOpt,
    _print_whole,
    _reading_study,
    _search_api,
    _user_errors,
    app,
    out,
)


def _search(config_path: Path, overrides: list[str] | None, resume: bool, debug: bool = False,
            allow_changes: list[str] | None = None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..retry import safe_url

    search = _search_api(config_path, overrides)
    config = search.config
    out.print(f"study [bold]{config.study.name}[/]: {config.study.n_trials} trials, work dir {config.work_path}")
    with Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), console=out, transient=False) as bar:
        task = bar.add_task("trials", total=config.study.n_trials, status="preparing (dense model, Ray)")

        def on_progress(p) -> None:
            status = f"failed {p.failed} | running {p.running} | front {p.front_size}"
            bar.update(task, completed=p.done, status=status)
            if p.message:
                bar.console.print(f"  {p.message}", highlight=False)

        if resume:
            summary = search.resume(progress=on_progress, allow_changes=allow_changes or [], debug=debug)
        else:
            summary = search.run(progress=on_progress, debug=debug)
    if summary.recovered:
        out.print(f"re-enqueued trials left running by a stopped driver: {summary.recovered}")
    for line in summary.notices:
        out.print(f"repaired: {line}", highlight=False)
    out.print(f"done: {summary.completed} complete, {summary.failed} failed; MLflow parent run "
              f"{summary.parent_run_id} in {safe_url(config.tracking_uri)}")
    _print_front(summary.front, asdict(summary.dense))


def _print_front(rows: list[dict], dense: dict | None = None) -> None:
    """The front as a table, with the dense model as its last row for comparison."""
    table = Table(title="Pareto front")
    test = any(row.get("test_accuracy") is not None for row in rows)  # a test split was given
    metric = (dense or {}).get("metric") or "accuracy"  # perplexity for model.task: causal_lm (lower is better)
    names = ("accuracy", "acc. drop", "test acc.") if metric == "accuracy" else (metric, "increase", f"test {metric}")
    for column in ("trial", *names[:2], *((names[2],) if test else ()), "size (bytes)",
                   "latency (ms)", "params", "MACs"):
        table.add_column(column, justify="right")
    for row in rows:
        tested = (f"{row['test_accuracy']:.4f}" if row.get("test_accuracy") is not None else "",) if test else ()
        table.add_row(str(row["trial"]), f"{row['accuracy']:.4f}", f"{row['accuracy_drop']:+.4f}", *tested,
                      f"{row['size_bytes']:,}", f"{row['latency_ms']:.4f}", f"{row['params']:,}",
                      f"{row['macs']:,}")
    if dense:
        dense_test = (f"{dense['test_accuracy']:.4f}" if dense.get("test_accuracy") is not None else "",)
        table.add_row("dense", f"{dense['accuracy']:.4f}", "", *(dense_test if test else ()),
                      f"{dense['size_bytes']:,}", f"{dense['latency_ms']:.4f}", f"{dense['params']:,}",
                      f"{dense['macs']:,}", style="dim")
    _print_whole(table)


@app.command()
def run(config: ConfigArg, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Start a new search from CONFIG and print its Pareto front.

    The study (Optuna), the MLflow store, the dense model and every trial's pruned model go under
    the config's work_dir. Stop it any time (Ctrl-C): 'autoprune resume CONFIG' continues it.
    Then: 'autoprune front CONFIG', 'autoprune ui CONFIG', 'autoprune export CONFIG --trial N --out F'.
    """
    with _user_errors():
        _search(config, set_, resume=False, debug=debug)


@app.command()
def resume(config: ConfigArg, set_: SetOpt = None, debug: DebugOpt = False,
           allow_changes: Annotated[str | None, typer.Option(
               "--allow-changes", help="Config fields (comma-separated; a section ends in '.') that may differ "
                                       "from the study's, e.g. space.sparsity.high,finetune. (study.n_trials and "
                                       "execution.* always may).")] = None) -> None:
    """Continue a stopped or crashed search up to its trial count (same sampler, seed and study).

    A config that searches something else than the study did (space, model, data, fine-tuning...) is refused,
    naming the changed fields, unless --allow-changes lists them.
    """
    with _user_errors():
        allowed = [f.strip() for f in (allow_changes or "").split(",") if f.strip()]
        _search(config, set_, resume=True, debug=debug, allow_changes=allowed)


@app.command()
def front(config: ConfigArg, set_: SetOpt = None,
          as_json: Annotated[bool, typer.Option(
              "--json", help="Print the front as JSON: every trial's objectives, params, MACs, sparsity, baseline "
                             "label and plan (its sampled parameters), full values.")] = False,
          as_csv: Annotated[bool, typer.Option(
              "--csv", help="Print the front as CSV: the same values, one plan.<parameter> column each.")] = False,
          ) -> None:
    """Print the Pareto front of the study: accuracy, drop, size, latency, params, MACs."""
    with _user_errors():
        from .. import pareto
        from ..study import DENSE_ATTR

        if as_json and as_csv:
            raise typer.BadParameter("give one of --json and --csv")
        search = _search_api(config, set_)
        with _reading_study(search.config.storage_url):
            records = [asdict(record) for record in search.front()]
            dense = search.study.user_attrs.get(DENSE_ATTR) or {}
        if as_json:
            sys.stdout.write(json.dumps(records, indent=2) + "\n")
        elif as_csv:
            sys.stdout.write(pareto.records_csv(records))
        else:
            _print_front(records, dense or None)


@app.command()
def export(config: ConfigArg,
           trial: Annotated[int, typer.Option("--trial", "-t", help="Trial number (see 'autoprune front').")],
           out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .pt2 or .onnx file.")],
           set_: SetOpt = None,
           fmt: Annotated[str | None, typer.Option(
               "--format", "-f", help="torch (a torch.export .pt2 file) or onnx (dynamic batch, checked in ONNX "
                                      "Runtime); default: onnx for an --out ending in .onnx, else torch.")] = None,
           ) -> None:
    """Write a trial's pruned model as a torch.export or ONNX file that loads without autoprune or the model class."""
    with _user_errors():
        report = _search_api(config, set_).export(trial, out_path, fmt)
        batch = "" if report.dynamic_batch else f"; fixed batch size {report.samples}: the model specialises it"
        load = (f"onnxruntime.InferenceSession({str(report.path)!r})" if report.format == "onnx"
                else f"torch.export.load({str(report.path)!r}).module()")
        checked = "ONNX Runtime's outputs match" if report.format == "onnx" else "outputs match"
        out.print(f"wrote {report.path} ({report.bytes:,} bytes{batch}); {checked} the trial's model "
                  f"(max abs diff {report.max_abs_diff:.2e} on {report.samples} samples). Load with: {load}")
