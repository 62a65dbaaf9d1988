"""A tiny search through the real CLI on the real stack: local Ray on 127.0.0.1,
Optuna on SQLite, MLflow on its own SQLite store; then front, resume and export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from autoprune.config import load_config

BIN = Path(sys.executable).parent


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "COLUMNS": "200"}
    proc = subprocess.run([str(BIN / "autoprune"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"autoprune {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def child_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("autoprune.role") == "trial"]


def test_run_front_resume_export(tiny_project: Path, tmp_path: Path) -> None:
    config = load_config(tiny_project)
    run = cli("run", str(tiny_project), cwd=tmp_path)
    assert "Pareto front" in run.stdout

    study = optuna.load_study(study_name="tiny", storage=config.storage_url)
    trials = study.get_trials()
    assert len(trials) == 4
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4, [t.user_attrs.get("fail_reason") for t in trials]
    for t in complete:
        accuracy, size, latency = t.values
        assert 0.0 <= accuracy <= 1.0 and size > 0 and latency > 0
        assert t.user_attrs["nonzero_params"] <= t.user_attrs["params"]
    assert study.user_attrs["autoprune.config"]["study"]["name"] == "tiny"
    dense = study.user_attrs["autoprune.dense"]
    assert dense["accuracy"] > 0.5  # the pretrained tiny CNN learned something

    # MLflow: a parent run, a child per trial, Pareto tags that agree with Optuna.
    client = MlflowClient(config.tracking_uri)
    children = child_runs(client, "tiny")
    assert sorted(int(r.data.tags["autoprune.trial"]) for r in children) == [0, 1, 2, 3]
    pareto_numbers = {t.number for t in study.best_trials}
    tagged = {int(r.data.tags["autoprune.trial"]) for r in children if r.data.tags["pareto"] == "true"}
    assert tagged == pareto_numbers
    parent_ids = {r.data.tags["mlflow.parentRunId"] for r in children}
    assert len(parent_ids) == 1
    parent = client.get_run(parent_ids.pop())
    assert parent.data.metrics["dense_accuracy"] == pytest.approx(dense["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.csv", "pareto_front.html", "config.json"} <= artifacts
    some_child = children[0]
    assert "accuracy" in some_child.data.metrics and "size_bytes" in some_child.data.metrics
    assert any(k.endswith(".sparsity") for k in some_child.data.params)

    # front --json agrees with Optuna's Pareto set.
    front = json.loads(cli("front", str(tiny_project), "--json", cwd=tmp_path).stdout)
    assert {row["trial"] for row in front} == pareto_numbers
    for row in front:
        assert {"accuracy", "accuracy_drop", "size_bytes", "latency_ms", "params", "macs"} <= set(row)

    # resume adds trials to the same study and logs no duplicate runs; the backend may change on resume (here to
    # in-process: the run above was on a local Ray, and a second Ray start would cost this test seconds only)
    cli("resume", str(tiny_project), "--set", "study.n_trials=6", "--set", "execution.backend=in_process",
        cwd=tmp_path)
    study = optuna.load_study(study_name="tiny", storage=config.storage_url)
    assert len(study.get_trials()) == 6
    children = child_runs(client, "tiny")
    assert sorted(int(r.data.tags["autoprune.trial"]) for r in children) == [0, 1, 2, 3, 4, 5]
    parents = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
               if r.data.tags.get("autoprune.role") == "study"]
    assert len(parents) == 1

    # export: a file that loads with torch alone, without autoprune or the model class.
    number = front[0]["trial"]
    out = tmp_path / "exported" / "model.pt2"
    cli("export", str(tiny_project), "--trial", str(number), "--out", str(out), cwd=tmp_path)
    probe = (
        "import sys, torch\n"
        f"m = torch.export.load({str(out)!r}).module()\n"
        "y = m(torch.zeros(5, 1, 8, 8))\n"
        "assert 'autoprune' not in sys.modules and 'tinymod' not in sys.modules\n"
        "print(tuple(y.shape))\n"
    )
    clean = tmp_path / "clean"
    clean.mkdir()
    loaded = subprocess.run([sys.executable, "-I", "-c", probe], cwd=clean, capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "(5, 10)"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["space.methods=[l1_unstructured, nope]"], "unknown pruning method 'nope'"),
        (["space.sparsity.high=1.2"], "field 'space.sparsity.high'"),
        (["model.factory=tinymod:missing"], "field 'model.factory': module 'tinymod' has no attribute 'missing'"),
        (["model.factory=nomodule:make"], "cannot import module 'nomodule'"),
        (["model.factory=tinymod:not_a_model"], "expected the factory to return a torch.nn.Module, got int"),
        (["space.include=[conv9*]"], "pattern 'conv9*' matches no prunable unit"),
        (["study.storage=postgresql+psycopg://u:secret@127.0.0.1:1/nodb"], "field 'study.storage': cannot connect"),
    ],
)
def test_bad_input_exits_2_with_one_message(tiny_project: Path, overrides: list[str], expected: str) -> None:
    """In-process (Typer's runner): one line on stderr, exit 2, no traceback, no password, nothing written."""
    from typer.testing import CliRunner

    from autoprune.cli import app

    args = ["run", str(tiny_project)]
    for item in overrides:
        args += ["--set", item]
    try:
        result = CliRunner().invoke(app, args)
    finally:
        sys.modules.pop("tinymod", None)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.output and "secret" not in result.output
    assert not (tiny_project.parent / "work").exists()  # checked before anything is written


def test_bad_checkpoint_is_named(tiny_project: Path, tmp_path: Path) -> None:
    import torch

    ckpt = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, ckpt)
    proc = cli("run", str(tiny_project), "--set", "model.pretrain=null", "--set", f"model.checkpoint={ckpt}",
               cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "field 'model.checkpoint'" in proc.stderr and "does not match the model" in proc.stderr
