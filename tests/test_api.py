"""The Python API: a search on objects defined in code, run, resumed, reopened and inspected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune
from autoprune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


class Inline(nn.Module):
    """A model defined in the test, not in an importable factory module."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


@pytest.fixture(scope="module")
def objects() -> tuple[nn.Module, TensorDataset, DataLoader, TensorDataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:600], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:600])
    torch.manual_seed(0)
    model = Inline()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(15):
        for xb, yb in DataLoader(TensorDataset(x[:400], y[:400]), batch_size=50, shuffle=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    return (model.eval(), TensorDataset(x[:400], y[:400]), DataLoader(TensorDataset(x[400:500], y[400:500]),
                                                                      batch_size=100),
            TensorDataset(x[500:], y[500:]))


def _config(tmp_path: Path, n_trials: int = 2) -> dict:
    return {"study": {"name": "inline", "n_trials": n_trials, "sampler": "random", "baselines": []},
            "work_dir": str(tmp_path / "work"),
            "space": {"methods": ["l1_structured"], "sparsity": {"low": 0.2, "high": 0.7, "step": 0.1}},
            "finetune": {"epochs": 1}, "latency": {"rounds": 1, "min_run_time": 0.005},
            "execution": {"backend": "in_process"}}


def test_search_on_objects_run_inspect_resume_reload(objects, tmp_path: Path) -> None:
    model, train_set, val_loader, test_set = objects
    before = {k: v.clone() for k, v in model.state_dict().items()}
    search = autoprune.Search(_config(tmp_path), model=model, train_data=train_set, val_data=val_loader,
                              test_data=test_set)
    summary = search.run()
    assert (summary.completed, summary.failed) == (2, 0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model untouched

    trials = search.trials()
    assert [t.trial for t in trials] == [0, 1] and all(t.state == "COMPLETE" for t in trials)
    front = search.front()
    assert front and all(t.on_front for t in front)
    assert [t.size_bytes for t in front] == sorted(t.size_bytes for t in front)
    best = front[0]
    assert set(best.plan) == {"body.0/sparsity", "body.2/sparsity"}  # the head is protected

    pruned = search.load_model(best.trial)
    kept = pruned.body[0].out_features
    assert kept == 48 - round(48 * best.plan["body.0/sparsity"])  # channels really removed
    x, y = next(iter(val_loader))
    with torch.no_grad():
        accuracy = float((pruned(x).argmax(1) == y).float().mean())
    assert accuracy == pytest.approx(best.accuracy)  # the stored objective is this model's
    assert 0.0 <= search.evaluate(best.trial) <= 1.0  # on test data the search never selected on

    frame = search.front_frame()
    assert list(frame.index) == [t.trial for t in front] and "plan.body.0/sparsity" in frame.columns
    study = search.study
    assert study.metric_names == ["accuracy", "size_bytes", "latency_ms"]  # other Optuna clients see names

    summary = search.resume(n_trials=3)
    assert summary.completed == 3
    again = autoprune.load_search("inline", search.config.storage_url, model=model, train_data=train_set,
                                  val_data=val_loader)
    assert [t.trial for t in again.trials()] == [0, 1, 2]
    assert again.config.space == search.config.space

    exported = search.export(best.trial, tmp_path / "best.pt2")
    program = torch.export.load(exported.path).module()
    with torch.no_grad():
        assert torch.allclose(program(x), pruned(x), atol=1e-5)


def test_resume_refuses_a_changed_search_unless_allowed(objects, tmp_path: Path) -> None:
    model, train_set, val_loader, _ = objects
    autoprune.Search(_config(tmp_path, 1), model=model, train_data=train_set, val_data=val_loader).run()
    changed = _config(tmp_path, 2)
    changed["space"]["sparsity"]["high"] = 0.8
    search = autoprune.Search(changed, model=model, train_data=train_set, val_data=val_loader)
    with pytest.raises(ConfigError, match=r"changed: space\.sparsity\.high.*--allow-changes space\.sparsity\.high"):
        search.resume()
    wider = Inline()  # another architecture is another search too
    wider.head = nn.Linear(32, 10, bias=False)
    with pytest.raises(ConfigError, match=r"inputs\.model"):
        autoprune.Search(_config(tmp_path, 2), model=wider, train_data=train_set, val_data=val_loader).resume()
    assert search.resume(allow_changes=["space.sparsity.high"]).completed == 2  # n_trials may always change


def test_bad_arguments_name_what_is_wrong(objects, tmp_path: Path) -> None:
    model, train_set, val_loader, _ = objects
    with pytest.raises(ConfigError, match=r"field 'study\.n_trials'.*got 0"):
        autoprune.Search({"study": {"name": "x", "n_trials": 0}})
    with pytest.raises(ConfigError, match=r"argument 'model': expected a torch\.nn\.Module, got str"):
        autoprune.Search({"study": {"name": "x"}}, model="resnet", train_data=train_set, val_data=val_loader)
    with pytest.raises(ConfigError, match="'train_data' and 'val_data': expected both or neither"):
        autoprune.Search({"study": {"name": "x"}}, model=model, train_data=train_set)
    search = autoprune.Search({"study": {"name": "x"}, "work_dir": str(tmp_path)}, model=model)
    with pytest.raises(ConfigError, match=r"field 'data\.factory': required unless the data are given"):
        search.run()
    with pytest.raises(ValueError, match="n_trials: expected a positive integer, got -1"):
        search.run(n_trials=-1)
    assert not (tmp_path / "optuna.db").exists()


def test_import_autoprune_is_light() -> None:
    code = "import sys, autoprune; print(sorted(m for m in ('torch', 'mlflow', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_notebook_example_on_a_local_ray(tmp_path: Path) -> None:
    """examples/notebook_search.py as a user runs it: the model class lives in ``__main__`` and reaches the
    Ray workers through the object store."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "notebook_search.py"), str(tmp_path / "nb"), "4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "4 complete, 0 failed" in proc.stdout
    assert "smallest front model: trial" in proc.stdout and "test accuracy" in proc.stdout
    study = optuna.load_study(study_name="notebook", storage=f"sqlite:///{tmp_path / 'nb' / 'optuna.db'}")
    workers = {t.user_attrs["autoprune.worker"]["worker_pid"] for t in study.trials}
    assert os.getpid() not in workers and len(study.trials) == 4
