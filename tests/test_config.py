"""Config validation: every bad input is one clear ConfigError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoprune.config import apply_overrides, load_config
from autoprune.errors import ConfigError


def test_loads_defaults_and_resolves_paths(tiny_project: Path) -> None:
    config = load_config(tiny_project)
    assert config.study.n_trials == 4
    assert config.work_path == (tiny_project.parent / "work").resolve()
    assert config.storage_url == f"sqlite:///{tiny_project.parent.resolve() / 'work' / 'optuna.db'}"
    assert config.tracking_uri.endswith("work/mlflow.db")
    assert config.storage_url != config.tracking_uri  # never one database for both
    assert config.experiment_name == "tiny"


def test_overrides_are_typed_and_nested(tiny_project: Path) -> None:
    config = load_config(tiny_project, ["study.n_trials=7", "space.sparsity.high=0.5", "execution.backend=in_process"])
    assert config.study.n_trials == 7
    assert config.space.sparsity.high == 0.5
    assert config.execution.backend == "in_process"


def test_apply_overrides_does_not_mutate() -> None:
    raw = {"a": {"b": 1}}
    assert apply_overrides(raw, ["a.b=2", "c.d=[1, 2]"]) == {"a": {"b": 2}, "c": {"d": [1, 2]}}
    assert raw == {"a": {"b": 1}}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("study.bogus=1", "field 'study.bogus': unknown key"),
        ("space.sparsity.high=1.0", "field 'space.sparsity.high'"),
        ("space.sparsity.low=-0.1", "field 'space.sparsity.low'"),
        ("space.methods=[l1_unstructured, nope]", "unknown pruning method 'nope'; known methods: "),
        ("study.n_trials=0", "field 'study.n_trials'"),
        ("study.sampler=cmaes", "field 'study.sampler'"),
        ("model.factory=nocolon", "expected 'module:callable', got 'nocolon'"),
        ("model.checkpoint=x.pt", "expected exactly one of 'checkpoint' or 'pretrain'"),
        ("space.sparsity={low: 0.6, high: 0.5}", "expected low <= high"),
        ("study", "expected 'dotted.key=value'"),
    ],
)
def test_bad_values_name_the_field(tiny_project: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tiny_project, [override])
    message = str(info.value)
    assert expected in message
    assert str(tiny_project) in message or override == "study"


def test_given_value_is_quoted(tiny_project: Path) -> None:
    with pytest.raises(ConfigError, match=r"got 1\.5"):
        load_config(tiny_project, ["space.sparsity.high=1.5"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_missing_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("study: {name: x}\n")
    with pytest.raises(ConfigError, match=r"field 'model\.factory': required but missing"):
        load_config(path)


def test_ready_configs_validate() -> None:
    """Every search shipped in search_spaces/ loads."""
    configs = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_baselines_default_to_the_sparsity_range(tiny_project: Path) -> None:
    default = load_config(tiny_project, ["study.baselines=null"])
    assert default.baseline_sparsities == [0.25, 0.5, 0.75]  # space.sparsity is [0.1, 0.8]
    narrow = load_config(tiny_project, ["study.baselines=null", "space.sparsity={low: 0.3, high: 0.6}"])
    assert narrow.baseline_sparsities == [0.5]
    assert load_config(tiny_project, ["study.baselines=[]"]).baseline_sparsities == []
    with pytest.raises(ConfigError, match=r"field 'study.baselines': expected sparsities within space.sparsity "
                                          r"\[0.1, 0.8\], got 0.9"):
        load_config(tiny_project, ["study.baselines=[0.9]"])


def test_a_field_newer_than_the_study_is_no_change_at_its_default(tiny_project: Path) -> None:
    """A study made before a field existed searched with what is now its default: resuming it is allowed;
    any other value of the new field is a change."""
    from autoprune.config import config_changes

    current = load_config(tiny_project).snapshot()
    stored = {**current, "finetune": {k: v for k, v in current["finetune"].items() if k != "precision"},
              "space": {k: v for k, v in current["space"].items() if k not in ("parametrization", "allocation_spread")}}
    assert config_changes(stored, current) == []
    edited = load_config(tiny_project, ["finetune.precision=bf16", "space.parametrization=global"]).snapshot()
    assert config_changes(stored, edited) == ["finetune.precision", "space.parametrization"]
