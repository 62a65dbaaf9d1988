"""autoprune's own database: a registry of searches, migrated with alembic.

One code path for SQLite and PostgreSQL. The tables are defined in
:mod:`autoprune.db.schema`; their migrations live in ``autoprune/db/migrations``
(inside the package, so ``autoprune db upgrade`` works from an installed
wheel, not only from a checkout). The database is ``study.db_url`` (default
``sqlite:///<work_dir>/autoprune.db``) and is never the Optuna or MLflow one.

At search start :func:`prepare` checks the schema version: a new, empty
database is created at the current revision; one that is behind stops the
search with the fix (``autoprune db upgrade CONFIG``); one that is ahead (made
by a newer autoprune) stops it too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import StorageError
from ..retry import call_with_retries, safe_url
from ..storage import safe_snapshot
from .schema import VERSION_TABLE, Search

if TYPE_CHECKING:
    from alembic.config import Config

    from ..config import SearchConfig

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DB_FILE = "autoprune.db"
FIX = "run 'autoprune db upgrade CONFIG'"


def database_url(config: SearchConfig) -> str:
    """The URL of autoprune's own database for ``config``."""
    return config.study.db_url or f"sqlite:///{config.work_path / DB_FILE}"


@dataclass(frozen=True)
class SchemaState:
    current: str | None
    """The database's revision (None: not created)."""
    head: str
    """The revision this autoprune expects."""
    empty: bool
    """No autoprune tables and no version table yet."""

    @property
    def status(self) -> str:
        if self.current == self.head:
            return "current"
        if self.empty:
            return "empty"
        return "ahead" if self.current is not None and self.current not in _known_revisions() else "behind"


def _engine(url: str) -> sqlalchemy.Engine:
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        return sqlalchemy.create_engine(url, pool_pre_ping=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"field 'study.db_url': cannot open {safe_url(url)}: {reason.replace(url, safe_url(url))}"
                           ) from None


@contextmanager
def _connect(url: str) -> Iterator[sqlalchemy.Connection]:
    engine = _engine(url)
    try:
        try:
            conn = call_with_retries(engine.connect, url, "connect", retry_s=10)
        except StorageError:
            raise
        except Exception as exc:  # wrong password, no such database, ...
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StorageError(f"field 'study.db_url': cannot open {safe_url(url)}: "
                               f"{reason.replace(url, safe_url(url))}") from None
        with conn:
            yield conn
    finally:
        engine.dispose()


def alembic_config(connection: sqlalchemy.Connection | None = None) -> Config:
    """alembic's config for autoprune's migrations (from the installed package), bound to ``connection``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _script():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None
    return head


def _known_revisions() -> set[str]:
    return {rev.revision for rev in _script().walk_revisions()}


def schema_state(url: str) -> SchemaState:
    """Where the database at ``url`` stands against this autoprune's migrations."""
    from alembic.runtime.migration import MigrationContext

    with _connect(url) as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        current = context.get_current_revision()
        tables = set(sqlalchemy.inspect(conn).get_table_names())
    empty = current is None and VERSION_TABLE not in tables and Search.__tablename__ not in tables
    return SchemaState(current, head_revision(), empty)


def upgrade(url: str, revision: str = "head") -> SchemaState:
    """Migrate the database at ``url`` to ``revision`` (creating it if new); returns the new state."""
    from alembic import command

    with _connect(url) as conn:
        with conn.begin():
            command.upgrade(alembic_config(conn), revision)
    return schema_state(url)


def downgrade(url: str, revision: str) -> SchemaState:
    from alembic import command

    with _connect(url) as conn:
        with conn.begin():
            command.downgrade(alembic_config(conn), revision)
    return schema_state(url)


def prepare(url: str) -> SchemaState:
    """Check the schema before a search writes anything: create a new database, refuse an outdated one."""
    from ..retry import store_lock

    with store_lock(url):  # two searches started at once on a fresh work dir: one creates the tables
        state = schema_state(url)
        if state.status == "current":
            return state
        if state.status == "empty":
            return upgrade(url)
    if state.status == "ahead":
        raise StorageError(f"autoprune database {safe_url(url)} is at revision {state.current!r}, newer than this "
                           f"autoprune knows (head {state.head!r}): upgrade autoprune")
    where = f"at revision {state.current!r}" if state.current else "at no revision (tables made by hand?)"
    raise StorageError(f"autoprune database {safe_url(url)} is {where}, behind this autoprune (head "
                       f"{state.head!r}): {FIX} to migrate it, then start the search again")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_search(url: str, *, study_name: str, storage_url: str, snapshot: Mapping[str, Any],
                  dense_checkpoint: Path | None, experiment_id: str | None, parent_run_id: str | None) -> Search:
    """Insert or update the registry row of a search (its storage URL and snapshot are stored masked)."""
    masked = safe_snapshot(snapshot)
    storage = safe_url(storage_url)
    now = datetime.now(UTC)
    values = {
        "config_snapshot": masked,
        "config_hash": hashlib.sha256(json.dumps(masked, sort_keys=True).encode()).hexdigest(),
        "dense_checkpoint": str(dense_checkpoint) if dense_checkpoint else None,
        "dense_sha256": file_sha256(dense_checkpoint) if dense_checkpoint and dense_checkpoint.is_file() else None,
        "mlflow_experiment_id": experiment_id,
        "mlflow_parent_run_id": parent_run_id,
        "updated_at": now,
    }

    def write() -> Search:
        with _connect(url) as conn, Session(bind=conn) as session:
            row = session.scalars(select(Search).where(Search.study_name == study_name,
                                                       Search.storage_url == storage)).one_or_none()
            if row is None:
                row = Search(study_name=study_name, storage_url=storage, created_at=now, **values)
                session.add(row)
            else:
                for key, value in values.items():
                    setattr(row, key, value)
            session.commit()
            session.refresh(row)
            session.expunge(row)
            return row

    try:
        return call_with_retries(write, url, "record search", retry_s=30)
    except IntegrityError:  # another driver inserted the row first: update it
        return call_with_retries(write, url, "record search", retry_s=30)


def list_searches(url: str) -> list[dict[str, Any]]:
    with _connect(url) as conn, Session(bind=conn) as session:
        rows = session.scalars(select(Search).order_by(Search.created_at)).all()
        return [{
            "study": r.study_name, "storage": r.storage_url, "config_hash": r.config_hash[:16],
            "dense_checkpoint": r.dense_checkpoint, "dense_sha256": r.dense_sha256,
            "mlflow_experiment_id": r.mlflow_experiment_id, "mlflow_parent_run_id": r.mlflow_parent_run_id,
            "created_at": r.created_at.isoformat(), "updated_at": r.updated_at.isoformat(),
        } for r in rows]


__all__ = ["FIX", "SchemaState", "database_url", "downgrade", "head_revision", "list_searches", "prepare",
           "record_search", "schema_state", "upgrade"]
