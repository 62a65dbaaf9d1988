"""Bad inputs and unsafe files: each is one line on stderr naming the file or field, exit code 2, no
traceback, and nothing created or changed on disk before the error (issue 8).

The CLI runs in this process (typer's CliRunner) to keep this fast; one small search (module fixture)
provides real trial files for export, digests and a second study in the same work dir.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from conftest import TINY_CONFIG, TINY_MODULE, run_tiny_search
from typer.testing import CliRunner

from autoprune.cli import app
from autoprune.config import load_config
from autoprune.errors import ConfigError, StorageError
from autoprune.model_files import FILES_ATTR, SKELETON_FILE, WEIGHTS_FILE

# Cheap settings, so that a check that wrongly passes runs a short search instead of a long one.
CHEAP = ["execution.backend=in_process", "study.n_trials=1", "model.pretrain.epochs=1"]
STORES = ("optuna.db", "mlflow.db", "autoprune.db")

BAD_MODELS = '''
import torch
from torch import nn
from tinymod import Tiny


def five_classes():
    model = Tiny(8)
    model.fc = nn.Linear(8 * 16, 5)
    return model


class NoBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Tiny(8)

    def forward(self, x):
        return self.inner(x).mean(0)  # the batch dimension is averaged away


def no_batch():
    return NoBatch()


def vector_loss(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")  # not a scalar
'''


@pytest.fixture(autouse=True)
def _forget_user_modules():
    """Factories are imported by module name: keep one test's modules (and sys.path) out of the next."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name in ("tinymod", "badmod"):
        sys.modules.pop(name, None)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "tinymod.py").write_text(TINY_MODULE)
    (tmp_path / "badmod.py").write_text(BAD_MODELS)
    config = tmp_path / "search.yaml"
    config.write_text(textwrap.dedent(TINY_CONFIG))
    return config


def invoke(*args: str) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def one_line_error(result, *needles: str) -> str:
    """The promise: exit code 2, exactly one line on stderr containing every needle, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def nothing_written(work: Path) -> None:
    assert not work.exists(), sorted(p.name for p in work.rglob("*"))


# ---------------------------------------------------------------- config files and fields
@pytest.mark.parametrize(("text", "where", "what"), [
    ("study: [unclosed\n", "line 2, column 1", "expected ',' or ']'"),
    ("study:\n\tname: x\n", "line 2, column 1", "not tabs"),
    ("study: {name: x}\nmodel: a: b\n", "line 2, column 9", "mapping values are not allowed"),
])
def test_malformed_yaml_is_one_line_with_its_place(project: Path, text: str, where: str, what: str) -> None:
    project.write_text(text)
    line = one_line_error(invoke("run", project), str(project), "not valid YAML", where, what)
    assert line.startswith("error: config ")
    nothing_written(project.parent / "work")


def test_bad_yaml_in_set_is_one_line(project: Path) -> None:
    one_line_error(invoke("run", project, *sets("study.baselines=[0.1", *CHEAP)),
                   "override 'study.baselines=[0.1'", "not valid YAML at line 1")
    nothing_written(project.parent / "work")


def test_a_directory_as_config_or_checkpoint_is_called_a_directory(project: Path) -> None:
    one_line_error(invoke("run", project.parent), "is a directory")
    (project.parent / "ckpt").mkdir()
    line = one_line_error(invoke("run", project, *sets(*CHEAP, "model.pretrain=null", "model.checkpoint=ckpt")),
                          "field 'model.checkpoint'", "is a directory")
    assert "not found" not in line
    nothing_written(project.parent / "work")


def test_work_dir_that_is_a_file(project: Path) -> None:
    (project.parent / "work").write_text("my notes\n")
    one_line_error(invoke("run", project, *sets(*CHEAP)), "field 'work_dir'", "expected a directory",
                   "is an existing file")
    assert (project.parent / "work").read_text() == "my notes\n"
    one_line_error(invoke("run", project, *sets("work_dir=work/sub", *CHEAP)), "field 'work_dir'",
                   "an existing file")
    with pytest.raises(ConfigError, match="field 'work_dir'"):
        load_config(project)


@pytest.mark.parametrize("name", ["..", ".", "a..b", "a/b"])
def test_study_names_that_are_not_one_directory(project: Path, name: str) -> None:
    one_line_error(invoke("run", project, *sets(f"study.name={name}", *CHEAP)), "field 'study.name'")
    nothing_written(project.parent / "work")


# ---------------------------------------------------------------- the model against the data
@pytest.mark.parametrize(("factory", "needles"), [
    ("badmod:five_classes", ("field 'model.factory'", "[100, 5]", "give 5 classes", "data.factory",
                             "class labels from 0 to 9")),
    ("badmod:no_batch", ("field 'model.factory'", "batch dimension", "outputs [10]", "data.factory",
                         "inputs [100, 1, 8, 8]")),
])
def test_model_outputs_that_do_not_fit_the_targets(project: Path, factory: str, needles: tuple[str, ...]) -> None:
    one_line_error(invoke("run", project, *sets(f"model.factory={factory}", *CHEAP)), *needles)
    nothing_written(project.parent / "work")


def test_a_loss_that_is_not_a_scalar(project: Path) -> None:
    one_line_error(invoke("run", project, *sets("model.loss=badmod:vector_loss", *CHEAP)),
                   "field 'model.loss'", "expected a scalar tensor", "[100]")
    nothing_written(project.parent / "work")


# ---------------------------------------------------------------- stores: checked before anything is written
def test_unreachable_postgres_tracking_uri_is_quick_and_masked(project: Path) -> None:
    pytest.importorskip("psycopg")
    started = time.monotonic()
    result = invoke("run", project, *sets("tracking.uri=postgresql+psycopg://bob:hunter2@127.0.0.1:1/mlflow",
                                          *CHEAP))
    line = one_line_error(result, "field 'tracking.uri'", "bob:***@127.0.0.1:1", "cannot connect")
    assert time.monotonic() - started < 30
    assert "hunter2" not in result.output and "hunter2" not in line
    nothing_written(project.parent / "work")


def test_tracking_uri_without_its_driver_says_what_to_install(project: Path) -> None:
    try:
        import pg8000  # noqa: F401
        pytest.skip("pg8000 is installed")
    except ImportError:
        pass
    uri = "postgresql+pg8000://bob:hunter2@127.0.0.1:1/mlflow"
    result = invoke("run", project, *sets(f"tracking.uri={uri}", *CHEAP))
    one_line_error(result, "field 'tracking.uri'", "'pg8000'", "not installed", "pip install")
    assert "hunter2" not in result.output
    nothing_written(project.parent / "work")
    from autoprune.tracking import Tracker

    with pytest.raises(StorageError, match=r"field 'tracking.uri': the database driver module 'pg8000'"):
        Tracker(uri, "x")


def test_unreachable_registry_db_url(project: Path) -> None:
    pytest.importorskip("psycopg")
    result = invoke("run", project, *sets("study.db_url=postgresql+psycopg://bob:hunter2@127.0.0.1:1/reg", *CHEAP))
    one_line_error(result, "field 'study.db_url'", "bob:***@")
    assert "hunter2" not in result.output
    nothing_written(project.parent / "work")


def test_resume_of_a_study_that_does_not_exist_creates_nothing(project: Path) -> None:
    work = project.parent / "work"
    one_line_error(invoke("resume", project, *sets(*CHEAP)), "field 'study.storage'", "no study database",
                   "autoprune run")
    nothing_written(work)
    # a study database holding another study: still nothing else is created
    work.mkdir()
    optuna.create_study(storage=f"sqlite:///{work / 'optuna.db'}", study_name="other")
    one_line_error(invoke("resume", project, *sets(*CHEAP)), "no study 'tiny'")
    assert sorted(os.listdir(work)) == ["optuna.db"]


def test_missing_sensitivity_json_creates_nothing(project: Path) -> None:
    one_line_error(invoke("run", project, *sets("space.sensitivity_bounds=true", *CHEAP)),
                   "field 'space.sensitivity_bounds'", "sensitivity.json")
    nothing_written(project.parent / "work")


def test_front_on_a_damaged_study_database(project: Path) -> None:
    work = project.parent / "work"
    work.mkdir()
    path = work / "optuna.db"
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name="tiny",
                                directions=["maximize", "minimize", "minimize"])
    for i in range(8):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        for key in ("accuracy_drop", "params", "nonzero_params", "macs", "param_sparsity"):
            trial.set_user_attr(key, 0)
        study.tell(trial, [0.5, 1000.0 - i, 1.0])
    del study
    result = invoke("front", project)
    assert result.exit_code == 0, result.output
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    pages = len(data) // 4096
    for page in rng.sample(range(1, pages), k=max(1, pages // 4)):  # random pages (not the header) overwritten
        data[page * 4096:(page + 1) * 4096] = rng.randbytes(4096)
    path.write_bytes(bytes(data))
    one_line_error(invoke("front", project), "field 'study.storage'", "malformed")


def test_front_without_a_study_database_creates_none(project: Path) -> None:
    (project.parent / "work").mkdir()
    one_line_error(invoke("front", project), "field 'study.storage'", "no study database")
    assert not (project.parent / "work" / "optuna.db").exists()


RACE = '''
import sys, time
from pathlib import Path
work, go = Path(sys.argv[1]), Path(sys.argv[2])
import mlflow  # noqa: F401  (imported before the start line: both processes then race for real)
from autoprune import db
from autoprune.retry import store_lock
from autoprune.storage import open_storage
from autoprune.tracking import Tracker
Path(sys.argv[3]).touch()  # ready
while not go.exists():
    time.sleep(0.005)
optuna_url = f"sqlite:///{work / 'optuna.db'}"
with store_lock(optuna_url):
    open_storage(optuna_url)
db.prepare(f"sqlite:///{work / 'autoprune.db'}")
Tracker(f"sqlite:///{work / 'mlflow.db'}", "tiny", artifact_location=(work / "artifacts").as_uri())
print("ok")
'''


def test_two_searches_creating_the_stores_at_once(tmp_path: Path) -> None:
    """Two drivers on a fresh work dir create Optuna's, autoprune's and MLflow's tables at the same moment:
    before the store lock, the loser died in MLflow's schema migration ('table ... already exists')."""
    work, go = tmp_path / "work", tmp_path / "go"
    work.mkdir()
    script = tmp_path / "race.py"
    script.write_text(RACE)
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(work), str(go), str(flag)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for flag in ready]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()  # both start creating the stores now
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, errors) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and out.strip() == "ok", errors[-3000:]


# ---------------------------------------------------------------- secrets
def test_query_string_passwords_are_masked() -> None:
    from autoprune.retry import mask_urls, safe_url
    from autoprune.storage import safe_snapshot

    url = "postgresql+psycopg://bob@db:5432/optuna?password=hunter2&sslmode=require"
    assert safe_url(url) == "postgresql+psycopg://bob@db:5432/optuna?password=***&sslmode=require"
    assert safe_url("postgresql://bob:hunter2@db/x") == "postgresql://bob:***@db/x"
    snapshot = safe_snapshot({"study": {"storage": url, "name": "a"}, "tracking": {"uri": "http://mlflow:5000"}})
    assert "hunter2" not in str(snapshot) and snapshot["tracking"]["uri"] == "http://mlflow:5000"
    assert "hunter2" not in mask_urls(f"cannot open {url}, really")


def test_ui_keeps_the_store_uri_off_the_command_line(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import autoprune.cli.inspect
    import autoprune.tracking

    uri = "postgresql+psycopg://bob:hunter2@127.0.0.1:5432/mlflow?password=hunter3"
    started = {}

    def execve(path, argv, env):
        started.update(path=path, argv=argv, env=env)

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setattr(autoprune.cli.inspect, "_port_free", lambda port: True)
    monkeypatch.setattr(autoprune.tracking, "find_parent", lambda *args: None)
    result = invoke("ui", project, *sets(f"tracking.uri={uri}"))
    assert result.exit_code == 0, result.output
    assert started["env"]["MLFLOW_BACKEND_STORE_URI"] == uri
    assert not any("hunter" in arg for arg in started["argv"]) and "--backend-store-uri" not in started["argv"]
    assert "hunter" not in result.output
    assert "MLFLOW_BACKEND_STORE_URI='postgresql+psycopg://bob:***@127.0.0.1:5432/mlflow?password=***'" in result.output


# ---------------------------------------------------------------- trial files: a real (small) search
@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory):
    """A finished 2-trial study (in-process, no MLflow models) in a work dir of its own."""
    yield run_tiny_search(tmp_path_factory.mktemp("searched"), ["tracking.log_models=false"])[:3]
    sys.modules.pop("tinymod", None)


def trial_files(config, number: int = 0) -> Path:

    return config.trial_path(number)


def test_the_study_keeps_the_digests_of_each_trials_files(searched) -> None:
    from autoprune.model_files import file_digests

    _, _, config = searched
    study = optuna.load_study(storage=config.storage_url, study_name="tiny")
    for trial in study.get_trials():
        assert trial.user_attrs[FILES_ATTR] == file_digests(trial_files(config, trial.number))
    assert trial_files(config, 0) == config.work_path / "studies" / "tiny" / "trials" / "00000"
    assert (config.work_path / "studies" / "tiny" / "dense.pt").is_file()
    assert not (config.work_path / "trials").exists() and not (config.work_path / "dense.pt").exists()


def test_export_out_paths(searched, tmp_path: Path) -> None:
    config_path, overrides, _ = searched
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    one_line_error(invoke("export", config_path, "--trial", "0", "--out", tmp_path / "adir", *sets(*overrides)),
                   "option '--out'", "is a directory")
    one_line_error(invoke("export", config_path, "--trial", "0", "--out", tmp_path / "afile" / "m.pt2",
                          *sets(*overrides)), "option '--out'", "afile is a file")
    assert (tmp_path / "afile").read_text() == "x"
    # /proc/self refuses new files even to root
    one_line_error(invoke("export", config_path, "--trial", "0", "--out", "/proc/self/model.pt2",
                          *sets(*overrides)), "option '--out'", "cannot write /proc/self/model.pt2")
    result = invoke("export", config_path, "--trial", "0", "--out", tmp_path / "new" / "m.pt2", *sets(*overrides))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "m.pt2").is_file()


class _Planted:
    """A pickle that, when loaded, creates ``marker``: code run by unpickling a planted file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def restored(searched):
    """Trial 0's files, put back as they were after the test changes them."""
    _, _, config = searched
    directory = trial_files(config)
    saved = {name: (directory / name).read_bytes() for name in (WEIGHTS_FILE, SKELETON_FILE)}
    yield directory
    for name, data in saved.items():
        (directory / name).write_bytes(data)


def test_a_planted_skeleton_is_refused_before_it_runs(searched, restored: Path, tmp_path: Path) -> None:
    import torch

    config_path, overrides, _ = searched
    marker = tmp_path / "pwned"
    torch.save(_Planted(marker), restored / SKELETON_FILE)
    out = tmp_path / "m.pt2"
    one_line_error(invoke("export", config_path, "--trial", "0", "--out", out, *sets(*overrides)),
                   str(restored / SKELETON_FILE), "sha256", "refusing to load it")
    assert not marker.exists() and not out.exists()


def test_missing_skeleton_and_truncated_weights(searched, restored: Path, tmp_path: Path) -> None:
    config_path, overrides, _ = searched
    out = tmp_path / "m.pt2"
    weights = (restored / WEIGHTS_FILE).read_bytes()
    (restored / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    one_line_error(invoke("export", config_path, "--trial", "0", "--out", out, *sets(*overrides)),
                   str(restored / WEIGHTS_FILE), "sha256")
    (restored / SKELETON_FILE).unlink()
    one_line_error(invoke("export", config_path, "--trial", "0", "--out", out, *sets(*overrides)),
                   str(restored / SKELETON_FILE), "is missing")
    assert not out.exists()


def test_a_second_study_in_the_same_work_dir_keeps_its_own_files(searched) -> None:
    from autoprune.model_files import file_digests
    from autoprune.search import run_search

    config_path, overrides, first = searched
    before = file_digests(trial_files(first, 0))
    dense = (first.study_path / "dense.pt").read_bytes()
    second = load_config(config_path, [*overrides, "study.name=wide", "study.n_trials=1",
                                       "space.sparsity={low: 0.5, high: 0.8}"])
    assert run_search(second).completed == 1
    assert file_digests(trial_files(first, 0)) == before  # the first study's trial 0 is untouched
    assert (first.study_path / "dense.pt").read_bytes() == dense
    assert trial_files(second, 0) == first.work_path / "studies" / "wide" / "trials" / "00000"
    assert (second.study_path / "dense.pt").is_file()
    wide = optuna.load_study(storage=second.storage_url, study_name="wide")
    assert wide.trials[0].user_attrs[FILES_ATTR] == file_digests(trial_files(second, 0))


def test_a_study_created_meanwhile_by_another_search_is_one_line() -> None:
    """Two 'autoprune run' of one study started at once: the loser's create_study fails inside Optuna."""
    from optuna.exceptions import DuplicatedStudyError

    from autoprune.cli import _storage_failure

    try:
        try:
            raise DuplicatedStudyError("Another study with name 'tiny' already exists.")
        except DuplicatedStudyError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as exc:
        line = _storage_failure(exc)
    assert line is not None and "\n" not in line
    assert "field 'study.name'" in line and "autoprune resume" in line
    assert _storage_failure(ValueError("a bug keeps its traceback")) is None


def test_report_without_a_study_database_creates_none(project: Path) -> None:
    (project.parent / "work").mkdir()
    one_line_error(invoke("report", project), "field 'study.storage'", "no study database")
    assert os.listdir(project.parent / "work") == []
