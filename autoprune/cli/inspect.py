"""``autoprune report``, ``ui`` and ``dashboard``: the study in MLflow and in optuna-dashboard."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ._app import ConfigArg, SetOpt, _load, _require_study_file, _search_api, _user_errors, app, err, out


# ---- looking at a study: MLflow report, MLflow UI, optuna-dashboard ----
def _sqlite_missing(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL that does not exist (opening it would create an empty store)."""
    from ..retry import sqlite_file

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

        from ..retry import safe_url

        search = _search_api(config, set_)
        cfg = search.config
        _require_study_file(cfg)
        result = search.report(register=register)
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

        from ..errors import StorageError
        from ..retry import safe_url
        from ..tracking import find_parent

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

        from ..retry import safe_url

        cfg = _load(config, set_)
        url = cfg.storage_url
        missing = _sqlite_missing(url)
        if missing is not None:
            from ..errors import StorageError

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

        from ..errors import StorageError
        from ..storage import open_storage
        from ..study import OBJECTIVES, load_study, make_sampler

        if not _port_free(port):
            raise StorageError(f"option '--port': port {port} on 127.0.0.1 is in use; pass another with --port")
        study = load_study(open_storage(url), cfg.study.name, make_sampler(cfg.study.sampler, cfg.study.seed))
        if study.metric_names is None:  # the dashboard's axis names instead of "Objective 0, 1, 2"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                study.set_metric_names(list(OBJECTIVES))
        out.print(f"optuna-dashboard: http://127.0.0.1:{port}/dashboard/ (Ctrl-C stops it)", highlight=False)
        run_server(url, host="127.0.0.1", port=port)
