"""autoprune's own database on SQLite and PostgreSQL: migrations match the ORM, the version check at
search start, 'autoprune db upgrade/status', the registry row of a real search, and the migrations
running from an installed wheel."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import optuna
import pytest
from alembic import command
from helpers_infra import BACKENDS, BIN, cli_env, stores

from autoprune import db
from autoprune.config import load_config
from autoprune.errors import StorageError
from autoprune.search import run_search

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "autoprune"), *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("backend", BACKENDS)
def test_schema_versions_and_registry(backend: str, tmp_path: Path) -> None:
    with stores(backend, tmp_path) as urls:
        url = urls["db"]
        assert db.schema_state(url).status == "empty"
        assert db.prepare(url).status == "current"  # a new database is created at head
        with db._connect(url) as conn:  # the migrations create exactly what the ORM defines
            command.check(db.alembic_config(conn))

        storage = "postgresql+psycopg://user:s3cret@db.example/optuna"
        first = db.record_search(url, study_name="s", storage_url=storage,
                                 snapshot={"study": {"storage": storage}}, dense_checkpoint=None,
                                 experiment_id="1", parent_run_id="p1")
        second = db.record_search(url, study_name="s", storage_url=storage,
                                  snapshot={"study": {"storage": storage, "n_trials": 5}}, dense_checkpoint=None,
                                  experiment_id="1", parent_run_id="p1")
        assert second.id == first.id and second.created_at == first.created_at
        assert second.updated_at >= first.updated_at
        rows = db.list_searches(url)
        assert len(rows) == 1 and "s3cret" not in json.dumps(rows)
        assert rows[0]["storage"] == "postgresql+psycopg://user:***@db.example/optuna"

        db.downgrade(url, "base")
        with pytest.raises(StorageError, match="run 'autoprune db upgrade CONFIG'"):
            db.prepare(url)
        assert db.upgrade(url).status == "current"

        with db._connect(url) as conn, conn.begin():
            conn.exec_driver_sql("UPDATE autoprune_schema_version SET version_num = 'ffff9999'")
        with pytest.raises(StorageError, match="newer than this autoprune"):
            db.prepare(url)


def test_search_refuses_an_outdated_database_then_records_itself(tiny_project: Path, tmp_path: Path) -> None:
    overrides = ["execution.backend=in_process", "study.n_trials=1", "model.pretrain.epochs=1",
                 "latency.rounds=1"]
    config = load_config(tiny_project, overrides)
    url = db.database_url(config)
    assert url.endswith("/work/autoprune.db")
    db.upgrade(url)
    db.downgrade(url, "base")
    with pytest.raises(StorageError, match="behind this autoprune") as err:
        run_search(config)
    assert "autoprune db upgrade CONFIG" in str(err.value)
    assert not optuna.get_all_study_summaries(config.storage_url)  # no study was created

    upgraded = cli("db", "upgrade", str(tiny_project), cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "revision none -> 0001" in upgraded.stdout

    summary = run_search(config)
    rows = db.list_searches(url)
    assert len(rows) == 1
    row = rows[0]
    dense = config.work_path / "studies" / "tiny" / "dense.pt"  # per study
    assert row["study"] == "tiny" and row["storage"] == config.storage_url
    assert row["dense_checkpoint"] == str(dense)
    assert row["dense_sha256"] == hashlib.sha256(dense.read_bytes()).hexdigest()
    assert row["mlflow_parent_run_id"] == summary.parent_run_id and row["mlflow_experiment_id"]

    status = cli("db", "status", str(tiny_project), "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["status"] == "current" and [s["study"] for s in shown["searches"]] == ["tiny"]


def test_migrations_run_from_an_installed_wheel(tmp_path: Path) -> None:
    """The alembic scripts ship inside the package: upgrade works with no checkout around."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("autoprune-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    assert (site / "autoprune" / "db" / "migrations" / "versions" / "0001_searches.py").is_file()
    probe = (
        "import sys, autoprune.db as d\n"
        f"assert d.__file__.startswith({str(site)!r}), d.__file__\n"
        f"print(d.upgrade('sqlite:///{tmp_path / 'w.db'}').status)\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ran = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=120,
                         env={**cli_env(), "PYTHONPATH": str(site)})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "current"
