"""``autoprune db``: autoprune's own database (the registry of searches)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ._app import ConfigArg, SetOpt, _load, _user_errors, app, out

# ---- db: autoprune's own database (registry of searches) ----
db_app = typer.Typer(help="autoprune's own database (the registry of searches): migrate and inspect it.",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(config: ConfigArg, set_: SetOpt = None) -> None:
    """Create or migrate autoprune's database (study.db_url; default <work_dir>/autoprune.db) to this version."""
    with _user_errors():
        from .. import db
        from ..retry import safe_url
        from ..storage import ensure_distinct_stores

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
        from .. import db
        from ..retry import safe_url

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


