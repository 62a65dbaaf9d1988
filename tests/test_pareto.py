"""Pareto ranks, hypervolume and its history, and the front's views (chart, PNG, summary)."""

from __future__ import annotations

import datetime as dt
import io
import itertools

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from autoprune import charts, pareto
from autoprune.plan import LayerPlan, Plan
from autoprune.study import DIRECTIONS, STALE_ATTR
from autoprune.trial import DenseBaseline

DENSE = DenseBaseline(accuracy=0.9, latency_ms=1.0, size_bytes=1000, params=100, macs=1000)
T0 = dt.datetime(2026, 1, 1)


def add(study: optuna.Study, accuracy: float | None, size: float = 0.0, latency: float = 0.0,
        state: TrialState = TrialState.COMPLETE, **attrs: object) -> None:
    """A finished trial, one second after the previous one."""
    when = T0 + dt.timedelta(seconds=len(study.trials))
    values = None if state != TrialState.COMPLETE else [accuracy, size, latency]
    trial = create_trial(state=state, values=values, user_attrs=dict(attrs))
    trial.datetime_start, trial.datetime_complete = when, when
    study.add_trial(trial)


def new_study() -> optuna.Study:
    return optuna.create_study(directions=list(DIRECTIONS))


def test_ranks_and_front_rows_agree_with_optuna() -> None:
    study = new_study()
    add(study, 0.80, 500, 0.5)   # 0: front
    add(study, 0.85, 700, 0.7)   # 1: front
    add(study, 0.70, 800, 0.8)   # 2: dominated by 0 and 1 -> rank 1
    add(study, 0.60, 900, 0.9)   # 3: dominated by 2 -> rank 2
    trials = pareto.complete_trials(study)
    assert pareto.ranks(trials) == {0: 0, 1: 0, 2: 1, 3: 2}
    assert {t.number for t in study.best_trials} == {0, 1}
    rows = pareto.front_rows(trials)
    assert [r["trial"] for r in rows] == [0, 1]  # smallest first
    csv_text = pareto.to_csv(rows)
    assert csv_text.splitlines()[0].split(",") == list(pareto.FRONT_COLUMNS)
    assert len(csv_text.splitlines()) == 1 + len(rows)


def test_hypervolume_is_normalised_by_the_dense_model() -> None:
    study = new_study()
    add(study, 1.0, 0.0, 0.0)  # a perfect, free model
    assert pareto.hypervolume(pareto.complete_trials(study), 1000, 1.0) == pytest.approx(1.0)
    study = new_study()
    add(study, 0.5, 500, 0.5)  # half accuracy, half size, half latency: 0.5 * 0.5 * 0.5
    assert pareto.hypervolume(pareto.complete_trials(study), 1000, 1.0) == pytest.approx(0.125)
    add(study, 0.95, 1200, 0.1)  # larger than dense: outside the reference box, adds nothing
    assert pareto.hypervolume(pareto.complete_trials(study), 1000, 1.0) == pytest.approx(0.125)
    assert pareto.hypervolume([], 1000, 1.0) == 0.0


def test_history_has_one_point_per_finished_trial() -> None:
    study = new_study()
    add(study, 0.5, 500, 0.5)
    add(study, None, state=TrialState.FAIL)
    add(study, 0.8, 400, 0.4)
    add(study, None, state=TrialState.FAIL, **{STALE_ATTR: True})  # left by a dead driver: not counted
    add(study, 0.1, 900, 0.9)  # dominated: hypervolume unchanged
    points = pareto.history(study, 1000, 1.0)
    assert [p.step for p in points] == [1, 2, 3, 4]
    assert [p.trial for p in points] == [0, 1, 2, 4]
    assert [p.front_size for p in points] == [1, 1, 1, 1]
    hv = [p.hypervolume for p in points]
    assert hv[0] == pytest.approx(0.125) and hv[1] == hv[0]
    assert hv[2] == pytest.approx(0.8 * 0.6 * 0.6) and hv[3] == hv[2]
    assert all(b >= a for a, b in itertools.pairwise(hv))  # never shrinks
    # already-logged steps are skipped; one trial's own step alone
    assert [p.step for p in pareto.history(study, 1000, 1.0, skip={1, 2})] == [3, 4]
    assert [p.step for p in pareto.history(study, 1000, 1.0, only_trial=2)] == [3]


def test_plan_summary() -> None:
    uniform = Plan((LayerPlan("a", "l1_unstructured", 0.5), LayerPlan("b", "l1_unstructured", 0.5)))
    assert charts.plan_summary(uniform) == "all 2 layers l1_unstructured 0.50"
    mixed = Plan((LayerPlan("a", "l1_structured", 0.3), LayerPlan("b", "l1_unstructured", 0.55)), quantize=True)
    assert charts.plan_summary(mixed) == "a l1_structured 0.30, b l1_unstructured 0.55 + int8"
    iterative = Plan(uniform.layers, schedule="iterative", rounds=3, rewind=True)
    assert charts.plan_summary(iterative) == "all 2 layers l1_unstructured 0.50 + iterative x3 + rewind"
    many = Plan(tuple(LayerPlan(f"l{i}", "l1_structured" if i % 2 else "random_unstructured", 0.1 * i)
                      for i in range(8)))
    assert charts.plan_summary(many) == ("random_unstructured x4 (mean 0.30, max 0.60), "
                                         "l1_structured x4 (mean 0.40, max 0.70)")


def points() -> list[charts.Point]:
    return [
        charts.Point(0, 0.88, 500, 0.6, rank=0, baseline="uniform l1_unstructured 0.5", plan="all 2 layers"),
        charts.Point(1, 0.70, 200, 0.3, rank=0, plan="a l1_structured 0.80"),
        charts.Point(2, 0.60, 700, 0.7, rank=1, plan="a l1_structured 0.20"),
        charts.Point(3, 0.89, 900, 0.95, rank=0, baseline="uniform l1_unstructured 0.1"),
    ]


def test_chart_traces_hold_every_point_once_plus_baselines_and_dense() -> None:
    fig = charts.figure(points(), DENSE, "t")
    lengths = {trace.uid: len(trace.x) for trace in fig.data}
    for panel in ("3d", "size", "latency"):
        assert lengths[f"front-{panel}"] == 3
        assert lengths[f"dominated-{panel}"] == 1
        assert lengths[f"baseline-{panel}"] == 2
        assert lengths[f"dense-{panel}"] == 1
    front_3d = next(t for t in fig.data if t.uid == "front-3d")
    assert "trial 1" in front_3d.hovertext[1] and "a l1_structured 0.80" in front_3d.hovertext[1]
    assert "20.0% of dense" in front_3d.hovertext[1]  # size 200 of 1000
    html = charts.html(points(), DENSE, "t")
    assert "<html>" in html[:100] and 'src="https://cdn.plot.ly' not in html
    assert len(html) > 3_000_000  # plotly.js is inside: the chart renders offline and in MLflow's sandbox


def test_png_is_a_picture() -> None:
    data = charts.png(points(), DENSE, "t")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib import image

    assert image.imread(io.BytesIO(data)).shape[1] > 1000


def test_summary_budgets_and_baselines() -> None:
    text = charts.summary_markdown("s", points(), DENSE, failed=1, hypervolume=0.25)
    assert "4 complete trials, 1 failed; **3 on the Pareto front**" in text
    lines = text.splitlines()
    size_rows = [line for line in lines if line.startswith("| ") and "% of dense (" in line and " B)" in line]
    assert len(size_rows) == len(charts.BUDGETS)
    assert size_rows[0].startswith("| 25% of dense (250 B) | 1 | 0.7000 | -0.2000 | 20.0% | 30.0% |")
    assert size_rows[1].startswith("| 50% of dense (500 B) | 0 (baseline) | 0.8800 | -0.0200")
    assert size_rows[3].startswith("| 100% of dense (1,000 B) | 3 (baseline) | 0.8900")
    latency_rows = [line for line in lines if "% of dense (" in line and " ms)" in line]
    assert latency_rows[0].startswith("| 25% of dense (0.2500 ms) | none fits")
    assert latency_rows[1].startswith("| 50% of dense (0.5000 ms) | 1 | 0.7000")
    # each baseline against the best other trial at most as large and as slow
    assert "| uniform l1_unstructured 0.5 | 0 | 0.8800 | 50.0% | 60.0% | yes | trial 1: accuracy 0.7000 (-0.1800) |" \
        in text
    front_rows = text.split("## The front")[1].strip().splitlines()[2:]
    assert len(front_rows) == 3


def test_summary_without_baselines_says_how_to_add_them() -> None:
    only = [p for p in points() if not p.baseline]
    text = charts.summary_markdown("s", only, DENSE, failed=0, hypervolume=0.1)
    assert "set `study.baselines`" in text

