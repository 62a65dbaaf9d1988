"""What every ``autoprune`` command shares: the Typer app, the consoles, the option types, and the
rule that an :class:`~autoprune.errors.AutopruneError` becomes one line on stderr and exit code 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import AutopruneError

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

    from ..retry import mask_urls

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
    from ..config import load_config

    return load_config(config, overrides or [])


def _require_study_file(cfg) -> None:
    """A missing SQLite study file is an error for commands that read a study (opening it would create it)."""
    from ..errors import StorageError
    from ..retry import sqlite_file

    path = sqlite_file(cfg.storage_url)
    if path is not None and not path.is_file():
        raise StorageError(f"field 'study.storage': no study database at {path}; run the search first "
                           f"('autoprune run CONFIG')")


def _open_study(cfg):
    """The config's existing study, creating nothing."""
    from ..storage import open_storage
    from ..study import load_study, make_sampler

    _require_study_file(cfg)
    return load_study(open_storage(cfg.storage_url), cfg.study.name, make_sampler(cfg.study.sampler, cfg.study.seed))


@contextmanager
def _reading_study(url: str) -> Iterator[None]:
    """A damaged study database (random pages overwritten...) read inside: one line naming study.storage."""
    import sqlite3

    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    from ..errors import StorageError
    from ..retry import first_line, safe_url

    try:
        yield
    except (StorageInternalError, SQLAlchemyError, sqlite3.DatabaseError) as exc:
        raise StorageError(f"field 'study.storage': cannot read the study database {safe_url(url)}: "
                           f"{_one_line(first_line(exc, url))}; is it damaged? Restore it from a backup") from None




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


def _search_api(config: Path, overrides: list[str] | None):
    """The :class:`autoprune.Search` of a config file: every command is a call on it."""
    from ..api import Search

    return Search(config, overrides=overrides or [])
