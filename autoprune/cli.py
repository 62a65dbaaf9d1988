"""The ``autoprune`` command line.

Each command turns an :class:`~autoprune.errors.AutopruneError` into one line on
stderr and exit code 2; everything else it prints goes to stdout.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import AutopruneError

app = typer.Typer(
    name="autoprune",
    help="Automated multi-objective pruning search for PyTorch (Optuna + Ray + MLflow).\n\n"
    "Start with: autoprune run search_spaces/digits_cnn.yaml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="The search's YAML config (see search_spaces/).",
                                           show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a config value: --set study.n_trials=50 (repeatable; value read as YAML).")]
DebugOpt = Annotated[bool, typer.Option(
    "--debug", help="Run trials one at a time in this process (execution.backend=in_process) and stop at the "
                    "first exception a trial raises, with its traceback, instead of recording a failed trial.")]


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except AutopruneError as exc:
        if getattr(exc, "autoprune_trial", None) is not None:  # --debug: a trial's own error keeps its traceback
            raise
        err.print(f"[bold red]error:[/] {escape(_one_line(str(exc)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted: finished trials are kept; continue with 'autoprune resume CONFIG'")
        raise typer.Exit(130) from None
    except Exception as exc:
        reason = _storage_failure(exc)
        if reason is None:
            raise
        err.print(f"[bold red]error:[/] {escape(reason)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _one_line(text: str) -> str:
    """The promise is one line per error: join any line breaks a message picked up from a library."""
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _storage_failure(exc: BaseException) -> str | None:
    """One line for a database error that escaped the commands' own checks (a damaged SQLite file read
    deep inside Optuna or MLflow); None for anything else, which keeps its traceback (a bug)."""
    import sqlite3

    from optuna.exceptions import DuplicatedStudyError, StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    from .retry import mask_urls

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DuplicatedStudyError):  # two 'autoprune run' of one study started at once
            return (f"field 'study.name': {_one_line(str(current))}: another search created it meanwhile; "
                    f"continue it with 'autoprune resume', or set another study.name")
        if isinstance(current, StorageInternalError | SQLAlchemyError | sqlite3.DatabaseError):
            root = getattr(current, "orig", None) or current
            text = _one_line(str(root))[:300] or type(root).__name__
            return mask_urls(f"a database of this search (study.storage, tracking.uri or study.db_url) failed: "
                             f"{type(root).__name__}: {text}; is the file damaged? Restore it from a backup, or "
                             f"use another work_dir")
        current = current.__cause__ or current.__context__
    return None


def _load(config: Path, overrides: list[str] | None):
    from .config import load_config

    return load_config(config, overrides or [])


def _require_study_file(cfg) -> None:
    """A missing SQLite study file is an error for commands that read a study (opening it would create it)."""
    from .errors import StorageError
    from .retry import sqlite_file

    path = sqlite_file(cfg.storage_url)
    if path is not None and not path.is_file():
        raise StorageError(f"field 'study.storage': no study database at {path}; run the search first "
                           f"('autoprune run CONFIG')")


def _open_study(cfg):
    """The config's existing study, creating nothing."""
    from .storage import open_storage
    from .study import load_study, make_sampler

    _require_study_file(cfg)
    return load_study(open_storage(cfg.storage_url), cfg.study.name, make_sampler(cfg.study.sampler, cfg.study.seed))


@contextmanager
def _reading_study(url: str) -> Iterator[None]:
    """A damaged study database (random pages overwritten...) read inside: one line naming study.storage."""
    import sqlite3

    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    from .errors import StorageError
    from .retry import first_line, safe_url

    try:
        yield
    except (StorageInternalError, SQLAlchemyError, sqlite3.DatabaseError) as exc:
        raise StorageError(f"field 'study.storage': cannot read the study database {safe_url(url)}: "
                           f"{_one_line(first_line(exc, url))}; is it damaged? Restore it from a backup") from None


def _search(config_path: Path, overrides: list[str] | None, resume: bool, debug: bool = False) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .retry import safe_url
    from .search import run_search

    debugging = ["execution.backend=in_process", "execution.debug=true"] if debug else []
    config = _load(config_path, [*(overrides or []), *debugging])
    out.print(f"study [bold]{config.study.name}[/]: {config.study.n_trials} trials, work dir {config.work_path}")
    with Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), console=out, transient=False) as bar:
        task = bar.add_task("trials", total=config.study.n_trials, status="preparing (dense model, Ray)")

        def on_progress(p) -> None:
            status = f"failed {p.failed} | running {p.running} | front {p.front_size}"
            bar.update(task, completed=p.done, status=status)
            if p.message:
                bar.console.print(f"  {p.message}", highlight=False)

        summary = run_search(config, resume=resume, on_progress=on_progress)
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
    for column in ("trial", "accuracy", "acc. drop", "size (bytes)", "latency (ms)", "params", "MACs"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["trial"]), f"{row['accuracy']:.4f}", f"{row['accuracy_drop']:+.4f}",
                      f"{row['size_bytes']:,}", f"{row['latency_ms']:.4f}", f"{row['params']:,}",
                      f"{row['macs']:,}")
    if dense:
        table.add_row("dense", f"{dense['accuracy']:.4f}", "", f"{dense['size_bytes']:,}",
                      f"{dense['latency_ms']:.4f}", f"{dense['params']:,}", f"{dense['macs']:,}", style="dim")
    _print_whole(table)


def _print_whole(table: Table) -> None:
    """Print ``table`` at its natural width however narrow the terminal or pipe: rich would shrink its columns
    to fit and cut numbers ('51,259,2…'); wider than a terminal, whole lines wrap and every value stays whole."""
    from rich.measure import Measurement

    for column in table.columns:
        column.no_wrap = True
    needed = Measurement.get(out, out.options.update_width(100_000), table).maximum
    if needed <= out.width:
        out.print(table)
        return
    wide = Console(file=out.file, width=needed, color_system=out.color_system, force_terminal=out.is_terminal,
                   no_color=out.no_color, highlight=False)
    wide.print(table, crop=False)


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
def resume(config: ConfigArg, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Continue a stopped or crashed search up to its trial count (same sampler, seed and study)."""
    with _user_errors():
        _search(config, set_, resume=True, debug=debug)


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
        from . import pareto
        from .study import DENSE_ATTR

        if as_json and as_csv:
            raise typer.BadParameter("give one of --json and --csv")
        cfg = _load(config, set_)
        with _reading_study(cfg.storage_url):
            study = _open_study(cfg)
            trials = pareto.complete_trials(study)
            rows = pareto.front_rows(trials)
        if as_json:
            sys.stdout.write(json.dumps(pareto.front_records(trials), indent=2) + "\n")
            return
        if as_csv:
            sys.stdout.write(pareto.records_csv(pareto.front_records(trials)))
            return
        dense = study.user_attrs.get(DENSE_ATTR) or {}
        _print_front(rows, dense or None)


@app.command()
def export(config: ConfigArg,
           trial: Annotated[int, typer.Option("--trial", "-t", help="Trial number (see 'autoprune front').")],
           out_path: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .pt2 file.")],
           set_: SetOpt = None) -> None:
    """Write a trial's pruned model as a torch.export file that loads without autoprune or the model class."""
    with _user_errors():
        from .export import export_trial

        cfg = _load(config, set_)
        from .workspace import Workspace

        report = export_trial(Workspace(cfg), trial, out_path)
        out.print(f"wrote {report.path} ({report.bytes:,} bytes); outputs match the trial's model "
                  f"(max abs diff {report.max_abs_diff:.2e} on {report.samples} samples). "
                  f"Load with: torch.export.load({str(report.path)!r}).module()")


def main() -> None:
    # MLflow and alembic announce every table they create; users want the search's own output. MLflow sets
    # its loggers' levels from MLFLOW_LOGGING_LEVEL when imported: ask for WARNING there instead of importing
    # MLflow here, which would cost seconds before even --help (a level the user set is kept).
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if "mlflow" in sys.modules:  # imported already (main() called in a process that uses MLflow)
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    app()


# ---- db: autoprune's own database (registry of searches) ----
db_app = typer.Typer(help="autoprune's own database (the registry of searches): migrate and inspect it.",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(config: ConfigArg, set_: SetOpt = None) -> None:
    """Create or migrate autoprune's database (study.db_url; default <work_dir>/autoprune.db) to this version."""
    with _user_errors():
        from . import db
        from .retry import safe_url
        from .storage import ensure_distinct_stores

        cfg = _load(config, set_)
        url = db.database_url(cfg)
        ensure_distinct_stores(cfg.storage_url, cfg.tracking_uri, url)
        before = db.schema_state(url)
        after = db.upgrade(url)
        out.print(f"autoprune database {safe_url(url)}: revision {before.current or 'none'} -> {after.current} "
                  f"(head {after.head})", highlight=False)


@db_app.command("status")
def db_status(config: ConfigArg, set_: SetOpt = None,
              as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """Show the database's schema revision against this autoprune's, and the searches it records."""
    with _user_errors():
        from . import db
        from .retry import safe_url

        cfg = _load(config, set_)
        url = db.database_url(cfg)
        state = db.schema_state(url)
        searches = db.list_searches(url) if state.status == "current" else []
        if as_json:
            sys.stdout.write(json.dumps({"url": safe_url(url), "revision": state.current, "head": state.head,
                                         "status": state.status, "searches": searches}, indent=2) + "\n")
            return
        fix = f" ({db.FIX})" if state.status in ("behind", "empty") else ""
        out.print(f"autoprune database {safe_url(url)}: revision {state.current or 'none'}, head {state.head}: "
                  f"{state.status}{fix}", highlight=False)
        for row in searches:
            out.print(f"  {row['study']} in {row['storage']}: config {row['config_hash']}, MLflow experiment "
                      f"{row['mlflow_experiment_id']} run {row['mlflow_parent_run_id']}, updated {row['updated_at']}",
                      highlight=False)


# ---- sensitivity ----
def _ratios_option(value: str) -> str:
    from .sensitivity import parse_ratios

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
        help="Tolerated accuracy drop (fraction, 0.05 = 5 points) that sets each unit's bound.")] = 0.05,
    methods: Annotated[list[str] | None, typer.Option(
        "--method", "-m", help="Measure only this method of space.methods (repeatable); default: every one.")] = None,
) -> None:
    """Accuracy against sparsity per unit and method, one unit pruned at a time, WITHOUT fine-tuning.

    Runs in this process on the dense model (no Ray). Writes <work_dir>/sensitivity.json, logs a plot and
    the JSON on the study's MLflow parent run, and prints each unit's bound: the largest sparsity whose
    accuracy drop is at most --max-drop. The next NEW study in this work dir evaluates two trials built
    from the bounds first (every unit at its bound, then at half of it).
    """
    with _user_errors():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from .sensitivity import parse_ratios, run_sensitivity

        cfg = _load(config, set_)
        with Progress(TextColumn("[bold]sensitivity"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[status]}"), console=out, transient=True) as bar:
            task = bar.add_task("sensitivity", total=None, status="building the model and data")

            def on_progress(p) -> None:
                bar.update(task, total=p.total, completed=p.done, status=p.message)

            result = run_sensitivity(cfg, parse_ratios(ratios), methods or None, max_drop, on_progress=on_progress)
        _print_sensitivity(cfg, config, result)


def _print_sensitivity(cfg, config_path: Path, result) -> None:
    from .retry import safe_url

    table = Table(title=f"Accuracy without fine-tuning, one unit pruned at a time (dense {result.dense_accuracy:.4f});"
                        f" bound = largest sparsity with drop <= {result.max_drop:g}")
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


# ---- looking at a study: MLflow report, MLflow UI, optuna-dashboard ----
def _sqlite_missing(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL that does not exist (opening it would create an empty store)."""
    from .retry import sqlite_file

    path = sqlite_file(url)  # parsed: a query string (?mode=ro, ?password=) is not part of the path
    return None if path is None or path.exists() else path


@app.command()
def report(config: ConfigArg, set_: SetOpt = None,
           register: Annotated[str | None, typer.Option(
               "--register", help="Also register each Pareto model as a version of this MLflow registered model "
                                  "(created if new; a model already registered there is skipped).")] = None) -> None:
    """Regenerate the study's MLflow records: front chart, tables, summary, tags, Pareto models.

    Logs the trial runs MLflow lacks, sets the Pareto tags, fills the hypervolume history, writes the parent run's
    chart (HTML, PNG), front (CSV, JSON) and summary, and an MLflow model for each Pareto-optimal trial that has
    none. Safe to run again: nothing is logged twice.
    """
    with _user_errors():
        import shlex

        from .report import regenerate
        from .retry import safe_url

        cfg = _load(config, set_)
        _require_study_file(cfg)
        from .workspace import Workspace

        result = regenerate(Workspace(cfg), register=register)
        created = " (created: the store had none)" if result.created_parent else ""
        say = {"highlight": False, "soft_wrap": True}
        out.print(f"parent run {result.parent_run_id}{created}, experiment {result.experiment_id}, "
                  f"in {safe_url(cfg.tracking_uri)}", **say)
        out.print(f"files: {', '.join(result.files) or 'none (no complete trial)'}", **say)
        logged = ", ".join(map(str, result.models_logged)) or "none (all were there)"
        out.print(f"Pareto front: trials {', '.join(str(r['trial']) for r in result.front) or 'none'}; "
                  f"MLflow models logged now: {logged}", **say)
        for number, version in result.registered:
            out.print(f"registered trial {number}'s model as '{register}' version {version}", **say)
        for number, reason in result.model_errors.items():
            err.print(f"trial {number}: model not logged: {reason}", **say)
        sets = "".join(f" --set {shlex.quote(item)}" for item in set_ or [])
        out.print(f"see it: autoprune ui {shlex.quote(str(config))}{sets}", **say)
    if result.model_errors:
        raise typer.Exit(1)


def _mlflow_executable() -> str:
    import shutil

    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.exists() else (shutil.which("mlflow") or "mlflow")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@app.command()
def ui(config: ConfigArg, set_: SetOpt = None,
       port: Annotated[int, typer.Option("--port", "-p", help="Port on 127.0.0.1.")] = 5000,
       print_only: Annotated[bool, typer.Option("--print", help="Only print the command and the links.")] = False,
       ) -> None:
    """Start the MLflow UI on the study's tracking store and print the links to its Pareto front.

    Runs 'mlflow server' (1 worker) on 127.0.0.1 in place of this command; Ctrl-C stops it.
    """
    with _user_errors():
        import os
        import shlex

        from .errors import StorageError
        from .retry import safe_url
        from .tracking import find_parent

        cfg = _load(config, set_)
        uri = cfg.tracking_uri
        missing = _sqlite_missing(uri)
        if missing is not None:
            raise StorageError(f"field 'tracking.uri': no MLflow store at {missing}; run the search first "
                               f"('autoprune run {config}')")
        # The store's URI goes in the environment, never on the command line (visible to every user in ps).
        command = [_mlflow_executable(), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        out.print(f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_BACKEND_STORE_URI={shlex.quote(safe_url(uri))} "
                  + shlex.join(command), highlight=False, soft_wrap=True)
        base = f"http://127.0.0.1:{port}"
        found = find_parent(uri, cfg.experiment_name, cfg.study.name)
        if found is None:
            out.print(f"no MLflow run for study {cfg.study.name!r} yet; experiments: "
                      f"{base}/#/experiments?workflowType=machine_learning", highlight=False, soft_wrap=True)
        else:
            experiment, run = found
            link = f"{base}/#/experiments/{experiment}/runs/{run}"
            out.print(f"study run:     {link}?workflowType=machine_learning", highlight=False, soft_wrap=True)
            out.print(f"Pareto chart:  {link}/artifacts/pareto_front.html?workflowType=machine_learning",
                      highlight=False, soft_wrap=True)
            out.print(f"front's runs:  {base}/#/experiments/{experiment}/runs?workflowType=machine_learning"
                      "&searchFilter=tags.pareto%20%3D%20'true'  (expand the study's row)",
                      highlight=False, soft_wrap=True)
        if print_only:
            return
        if not _port_free(port):
            raise StorageError(f"option '--port': port {port} on 127.0.0.1 is in use; pass another with --port")
        out.print("starting MLflow (ready in about 10 s; Ctrl-C stops it)", highlight=False)
        sys.stdout.flush()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_BACKEND_STORE_URI": uri}
        os.execve(command[0], command, env)  # the server replaces this process: signals reach it directly


@app.command()
def dashboard(config: ConfigArg, set_: SetOpt = None,
              port: Annotated[int, typer.Option("--port", "-p", help="Port on 127.0.0.1.")] = 8080,
              print_only: Annotated[bool, typer.Option("--print", help="Only print the command.")] = False) -> None:
    """Open the study in optuna-dashboard (Optuna's web UI: history, Pareto front, importances) on 127.0.0.1.

    optuna-dashboard is not a dependency of autoprune: without it this prints how to install it and exits 1.
    Names the study's objectives (accuracy, size_bytes, latency_ms) for its axes if they have no names yet.
    """
    with _user_errors():
        import importlib.util
        import shlex

        from .retry import safe_url

        cfg = _load(config, set_)
        url = cfg.storage_url
        missing = _sqlite_missing(url)
        if missing is not None:
            from .errors import StorageError

            raise StorageError(f"field 'study.storage': no study database at {missing}; run the search first")
        shown = ["optuna-dashboard", safe_url(url), "--host", "127.0.0.1", "--port", str(port)]
        installed = importlib.util.find_spec("optuna_dashboard") is not None
        if not installed:
            err.print("optuna-dashboard is not installed. Install it, then run it on the study's storage:",
                      highlight=False)
            out.print(f"{shlex.quote(sys.executable)} -m pip install optuna-dashboard", highlight=False, soft_wrap=True)
        out.print(shlex.join(shown), highlight=False, soft_wrap=True)
        if safe_url(url) != url:
            out.print("(password hidden: use the storage URL of your config)", highlight=False)
        if print_only:
            return
        if not installed:
            raise typer.Exit(1)
        import warnings

        from optuna_dashboard import run_server

        from .errors import StorageError
        from .storage import open_storage
        from .study import OBJECTIVES, load_study, make_sampler

        if not _port_free(port):
            raise StorageError(f"option '--port': port {port} on 127.0.0.1 is in use; pass another with --port")
        study = load_study(open_storage(url), cfg.study.name, make_sampler(cfg.study.sampler, cfg.study.seed))
        if study.metric_names is None:  # the dashboard's axis names instead of "Objective 0, 1, 2"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                study.set_metric_names(list(OBJECTIVES))
        out.print(f"optuna-dashboard: http://127.0.0.1:{port}/dashboard/ (Ctrl-C stops it)", highlight=False)
        run_server(url, host="127.0.0.1", port=port)
