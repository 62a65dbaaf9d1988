"""``autoprune front``: the table keeps every number whole at any width (piped to a file, a narrow terminal),
and ``--json`` / ``--csv`` carry full values. The study is written by hand (no search: fast)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import create_trial
from rich.console import Console
from typer.testing import CliRunner

from autoprune import cli
from autoprune.config import load_config
from autoprune.study import BASELINE_ATTR, DENSE_ATTR, DIRECTIONS

BIG_SIZE = 51_259_237_123  # '51,259,237,123' in the table; rich cut it to '51,259,2…' at 80 columns
BIG_MACS = 9_876_543_210_987
DISTRIBUTIONS = {"conv1/sparsity": FloatDistribution(0.0, 0.9, step=0.05),
                 "conv1/method": CategoricalDistribution(["l1_structured", "l1_unstructured"])}


def _attrs(accuracy: float, size: int, macs: int) -> dict[str, object]:
    return {"accuracy_drop": 0.9 - accuracy, "params": size // 4, "nonzero_params": size // 8, "macs": macs,
            "param_sparsity": 0.123456789}


@pytest.fixture
def finished(tiny_project: Path) -> Path:
    """The tiny config's study, holding two Pareto-optimal trials with huge sizes and MACs."""
    config = load_config(tiny_project)
    config.work_path.mkdir(parents=True)
    study = optuna.create_study(storage=config.storage_url, study_name=config.study.name,
                                directions=list(DIRECTIONS))
    study.set_user_attr(DENSE_ATTR, {"accuracy": 0.9, "size_bytes": BIG_SIZE * 2, "latency_ms": 2.0,
                                     "params": BIG_SIZE // 2, "macs": BIG_MACS * 2})
    for accuracy, size, latency, sparsity, baseline in ((0.8876543219, BIG_SIZE, 1.23456789, 0.35, None),
                                                        (0.7, BIG_SIZE // 3, 0.5, 0.8, "uniform 0.8")):
        attrs = _attrs(accuracy, size, BIG_MACS)
        if baseline:
            attrs[BASELINE_ATTR] = baseline
        study.add_trial(create_trial(values=[accuracy, size, latency], user_attrs=attrs,
                                     params={"conv1/sparsity": sparsity, "conv1/method": "l1_structured"},
                                     distributions=DISTRIBUTIONS))
    return tiny_project


@pytest.mark.parametrize("width", [40, 80])
def test_table_keeps_whole_numbers_at_any_width(finished: Path, monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    monkeypatch.setattr(cli, "out", Console(width=width))
    result = CliRunner().invoke(cli.app, ["front", str(finished)])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    for whole in (f"{BIG_SIZE:,}", f"{BIG_MACS:,}", f"{BIG_SIZE // 3:,}", f"{BIG_SIZE * 2:,}", f"{BIG_MACS * 2:,}"):
        assert whole in result.output, (whole, result.output)
    rows = [line for line in result.output.splitlines() if f"{BIG_MACS:,}" in line]
    assert len(rows) == 2  # one line per trial: no cell wrapped onto a second line


def test_json_and_csv_carry_full_values(finished: Path) -> None:
    runner = CliRunner()
    as_json = runner.invoke(cli.app, ["front", str(finished), "--json"])
    assert as_json.exit_code == 0, as_json.output
    records = json.loads(as_json.stdout)
    assert [r["trial"] for r in records] == [1, 0]  # smallest first
    first = records[1]
    assert first["accuracy"] == 0.8876543219 and first["latency_ms"] == 1.23456789
    assert first["size_bytes"] == BIG_SIZE and first["macs"] == BIG_MACS and first["params"] == BIG_SIZE // 4
    assert first["param_sparsity"] == 0.123456789 and first["baseline"] is None
    assert first["plan"] == {"conv1/sparsity": 0.35, "conv1/method": "l1_structured"}
    assert records[0]["baseline"] == "uniform 0.8"

    as_csv = runner.invoke(cli.app, ["front", str(finished), "--csv"])
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [int(r["trial"]) for r in rows] == [1, 0]
    assert int(rows[1]["size_bytes"]) == BIG_SIZE and int(rows[1]["macs"]) == BIG_MACS
    assert float(rows[1]["accuracy"]) == 0.8876543219 and float(rows[1]["latency_ms"]) == 1.23456789
    assert rows[1]["plan.conv1/sparsity"] == "0.35" and rows[1]["plan.conv1/method"] == "l1_structured"
    assert rows[0]["baseline"] == "uniform 0.8"

    both = runner.invoke(cli.app, ["front", str(finished), "--json", "--csv"])
    assert both.exit_code == 2
