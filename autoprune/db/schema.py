"""autoprune's own tables, in one place (SQLAlchemy 2 ORM). Changes here need an alembic revision in
``migrations/versions`` (see ``db/README.md``).

These tables live in their own database (``study.db_url``; default ``<work_dir>/autoprune.db``), never in
the Optuna or MLflow database: each of those keeps its own ``alembic_version`` table.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, Integer, MetaData, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

VERSION_TABLE = "autoprune_schema_version"
"""alembic's version table for these tables (named so it can never be confused with Optuna's or MLflow's)."""

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Search(Base):
    """One search (an Optuna study in one storage) and where everything about it lives."""

    __tablename__ = "searches"
    __table_args__ = (UniqueConstraint("study_name", "storage_url"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_name: Mapped[str] = mapped_column(String(255))
    storage_url: Mapped[str] = mapped_column(String(1024))
    """The Optuna storage URL, password masked."""
    config_snapshot: Mapped[dict] = mapped_column(JSON)
    """The validated config, passwords masked."""
    config_hash: Mapped[str] = mapped_column(String(64))
    """sha256 of the masked snapshot (sorted JSON)."""
    dense_checkpoint: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    dense_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    mlflow_parent_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
