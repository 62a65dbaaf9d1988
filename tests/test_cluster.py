"""A search on a two-node Ray cluster on 127.0.0.1 (ray.cluster_utils.Cluster: head + one node, 1 CPU each),
joined through execution.address, with the study on PostgreSQL when available (else SQLite): trials run on
both nodes, and the factory modules reach the workers through runtime_env py_modules."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import ray
from helpers_infra import PG_URL, ray_cluster, stores, write_fault_module
from optuna.trial import TrialState

from autoprune.config import load_config
from autoprune.search import run_search
from autoprune.study import WORKER_ATTR


@pytest.mark.slow
def test_search_on_a_two_node_cluster(tiny_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n_trials = 4
    project = tiny_project.parent
    write_fault_module(project, ["slow"], slow_s=1.0)  # trials long enough to overlap
    elsewhere = tmp_path / "driver-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # Ray adds the driver's cwd to workers' sys.path: keep the project out of it
    backend = "postgres" if PG_URL else "sqlite"
    with stores(backend, tmp_path) as urls, ray_cluster(nodes=2, cpus_per_node=1) as cluster:
        config = load_config(tiny_project, [
            "study.sampler=random", f"study.n_trials={n_trials}", "model.pretrain.epochs=2", "latency.rounds=1",
            "data.factory=faultmod:make_loaders", f"execution.address={cluster.address}", "execution.parallel=2",
            "execution.cpus_per_trial=1", "execution.memory_per_trial_mb=256", "execution.max_retries=1",
            f"study.storage={urls['optuna']}", f"tracking.uri={urls['mlflow']}", f"study.db_url={urls['db']}",
        ])
        summary = run_search(config)  # joins the cluster, and leaves it at the end
        ray.init(address=cluster.address, logging_level="WARNING")
        try:
            node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        finally:
            ray.shutdown()
        trials = optuna.load_study(study_name="tiny", storage=config.storage_url).get_trials()

    assert summary.completed == n_trials, summary
    assert [t.state for t in trials] == [TrialState.COMPLETE] * n_trials
    where = [t.user_attrs[WORKER_ATTR] for t in trials]
    assert len(node_ids) == 2
    assert {w["node_id"] for w in where} == node_ids  # both nodes ran trials
    for w in where:  # the user's modules came through py_modules, not from the project directory
        for name in ("tinymod", "faultmod"):
            path = w["modules"][name]
            assert path and not path.startswith(str(project)), (name, path)
