"""The front's views for the parent run: an interactive 3-D chart (self-contained HTML),
a static PNG and a Markdown summary, built from :class:`Point` rows and the dense model.

No Optuna, no MLflow here: :mod:`autoprune.report` gathers the points, :mod:`autoprune.tracking`
logs the files. See ``dashboards/README.md`` for what each view shows and where.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from .plan import Plan
from .trial import DenseBaseline

FRONT, DOMINATED, BASELINE, DENSE = "front", "dominated", "baseline", "dense"
COLORS = {FRONT: "#d62728", DOMINATED: "#9e9e9e", BASELINE: "#1f77b4", DENSE: "#111111"}


@dataclass(frozen=True)
class Point:
    """One complete trial as the views show it."""

    trial: int
    accuracy: float
    size_bytes: int
    latency_ms: float
    rank: int  # 0 = on the Pareto front
    accuracy_drop: float | None = None
    param_sparsity: float | None = None
    baseline: str | None = None  # enqueued on purpose, e.g. "uniform l1_unstructured 0.5"
    plan: str = ""  # one-line plan summary
    test_accuracy: float | None = None  # on the test split, when the data give one (never selected on)
    feasible: bool = True  # within space.constraints (an infeasible trial is never on the front)

    @property
    def on_front(self) -> bool:
        return self.rank == 0


def plan_summary(plan: Plan, limit: int = 6) -> str:
    """A one-line summary of a plan: every layer when few, else per method."""
    layers = plan.layers
    if not layers:
        text = "no prunable layer"
    elif len({(item.method, item.sparsity) for item in layers}) == 1:
        text = f"all {len(layers)} layers {layers[0].method} {layers[0].sparsity:.2f}"
    elif len(layers) <= limit:
        text = ", ".join(f"{item.layer} {item.method} {item.sparsity:.2f}" for item in layers)
    else:
        groups: dict[str, list[float]] = {}
        for item in layers:
            groups.setdefault(item.method, []).append(item.sparsity)
        text = ", ".join(f"{method} x{len(values)} (mean {sum(values) / len(values):.2f}, max {max(values):.2f})"
                         for method, values in groups.items())
    extras = ["int8"] if plan.quantize else []
    if getattr(plan, "schedule", "oneshot") != "oneshot":
        extras.append(f"{plan.schedule} x{plan.rounds}")
    if getattr(plan, "rewind", False):
        extras.append("rewind")
    return text + "".join(f" + {extra}" for extra in extras)


def _pct(value: float, dense: float) -> str:
    return f"{100.0 * value / dense:.1f}%" if dense else "n/a"


def _hover(p: Point, dense: DenseBaseline) -> str:
    role = ("Pareto front" if p.on_front else f"dominated (rank {p.rank})" if p.feasible
            else "infeasible (over a space.constraints limit)")
    lines = [f"<b>trial {p.trial}</b> - {role}" + (f" - baseline: {p.baseline}" if p.baseline else ""),
             f"{dense.metric} {p.accuracy:.4f}" + (f" (drop {p.accuracy_drop:+.4f})" if p.accuracy_drop is not None
                                                   else "")
             + (f", test {dense.metric} {p.test_accuracy:.4f}" if p.test_accuracy is not None else ""),
             f"size {p.size_bytes:,} B ({_pct(p.size_bytes, dense.size_bytes)} of dense)",
             f"latency {p.latency_ms:.4f} ms ({_pct(p.latency_ms, dense.latency_ms)} of dense)"]
    if p.param_sparsity is not None:
        lines.append(f"parameters removed or zero: {100 * p.param_sparsity:.1f}%")
    if p.plan:
        lines.append("plan: " + _wrap(p.plan))
    return "<br>".join(lines)


def _wrap(text: str, width: int = 90) -> str:
    out, line = [], ""
    for word in text.split(" "):
        if line and len(line) + len(word) + 1 > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    out.append(line)
    return "<br>&nbsp;&nbsp;".join(out)


def _groups(points: Sequence[Point]) -> dict[str, list[Point]]:
    """Every trial once as front or dominated; baselines again (an outline on top)."""
    return {
        FRONT: [p for p in points if p.on_front],
        DOMINATED: [p for p in points if not p.on_front],
        BASELINE: [p for p in points if p.baseline],
    }


def _lower(dense: DenseBaseline) -> bool:
    """Whether the first objective is lower-is-better (``perplexity``, ``model.task: causal_lm``)."""
    return getattr(dense, "metric", "accuracy") == "perplexity"


def _staircase(points: Sequence[Point], index: str, lower: bool = False) -> tuple[list[float], list[float]]:
    """The 2-D front: best accuracy (lowest perplexity) within each budget of ``index`` (size or latency)."""
    xs: list[float] = []
    ys: list[float] = []
    sign = -1.0 if lower else 1.0
    best = -float("inf")
    for p in sorted(points, key=lambda q: (getattr(q, index), -sign * q.accuracy)):
        if sign * p.accuracy > best:
            x = getattr(p, index) / (1024.0 if index == "size_bytes" else 1.0)
            if xs:
                xs.append(x)
                ys.append(best)
            xs.append(x)
            ys.append(p.accuracy)
            best = sign * p.accuracy
    return xs, ys


def figure(points: Sequence[Point], dense: DenseBaseline, title: str):
    """The interactive chart: a 3-D scatter (accuracy, size, latency) over two 2-D projections.

    Traces carry ``uid`` = ``<group>-<panel>`` (group: front, dominated, baseline,
    dense; panel: 3d, size, latency), so tests and users can find them.
    """
    from plotly import graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, specs=[[{"type": "scene", "colspan": 2}, None], [{}, {}]],
                        row_heights=[0.62, 0.38], vertical_spacing=0.08, horizontal_spacing=0.08,
                        subplot_titles=(f"{dense.metric}, size and latency (drag to rotate, scroll to zoom)",
                                        f"{dense.metric} vs size", f"{dense.metric} vs latency"))
    groups = _groups(points)
    dense_point = Point(-1, dense.accuracy, dense.size_bytes, dense.latency_ms, rank=0, plan="no pruning")
    names = {FRONT: f"Pareto front ({len(groups[FRONT])})", DOMINATED: f"other trials ({len(groups[DOMINATED])})",
             BASELINE: f"baselines ({len(groups[BASELINE])})", DENSE: "dense model"}
    styles = {
        FRONT: {"color": COLORS[FRONT], "size": 6, "symbol": "circle"},
        DOMINATED: {"color": COLORS[DOMINATED], "size": 4, "symbol": "circle", "opacity": 0.6},
        BASELINE: {"color": COLORS[BASELINE], "size": 9, "symbol": "diamond-open", "line": {"width": 2}},
        DENSE: {"color": COLORS[DENSE], "size": 7, "symbol": "x"},
    }
    dense_hover = (f"<b>dense model</b> (no pruning)<br>{dense.metric} {dense.accuracy:.4f}<br>"
                   f"size {dense.size_bytes:,} B<br>latency {dense.latency_ms:.4f} ms<br>"
                   f"{dense.params:,} parameters, {dense.macs:,} MACs")
    for group, members in [*groups.items(), (DENSE, [dense_point])]:
        style = dict(styles[group])
        opacity = style.pop("opacity", 1.0)
        hover = [dense_hover] if group == DENSE else [_hover(p, dense) for p in members]
        acc = [p.accuracy for p in members]
        kib = [p.size_bytes / 1024.0 for p in members]
        lat = [p.latency_ms for p in members]
        common = {"name": names[group], "legendgroup": group, "hovertext": hover, "hoverinfo": "text",
                  "opacity": opacity}
        marker3d = {**style, "size": style["size"] * 0.8, "symbol": "square" if group == DENSE else style["symbol"]}
        labels = {"mode": "markers+text", "text": ["dense"], "textposition": "top center"} if group == DENSE else {
            "mode": "markers"}
        fig.add_trace(go.Scatter3d(x=kib, y=lat, z=acc, uid=f"{group}-3d", marker=marker3d, **labels, **common),
                      row=1, col=1)
        marker2d = {**style, "symbol": "star" if group == DENSE else style["symbol"],
                    "size": style["size"] + (6 if group == DENSE else 2)}
        for col, xs, panel in ((1, kib, "size"), (2, lat, "latency")):
            fig.add_trace(go.Scatter(x=xs, y=acc, mode="markers", uid=f"{group}-{panel}", showlegend=False,
                                     marker=marker2d, **common), row=2, col=col)
    for col, index, panel in ((1, "size_bytes", "size"), (2, "latency_ms", "latency")):
        xs, ys = _staircase(points, index, _lower(dense))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", uid=f"staircase-{panel}", hoverinfo="skip",
                                 name=f"best {dense.metric} within budget", legendgroup="staircase",
                                 showlegend=col == 1,
                                 line={"color": COLORS[FRONT], "width": 1, "dash": "dot"}), row=2, col=col)
    fig.update_layout(
        title={"text": title, "x": 0.01, "y": 0.99, "yanchor": "top", "font": {"size": 15}}, height=1000,
        template="plotly_white", margin={"l": 40, "r": 20, "t": 110, "b": 40},
        legend={"orientation": "h", "x": 0.01, "y": 1.04, "yanchor": "bottom"},
        hoverlabel={"align": "left"},
        scene={"xaxis_title": "size (KiB)", "yaxis_title": "latency (ms)", "zaxis_title": dense.metric,
               "camera": {"eye": {"x": 1.6, "y": -1.6, "z": 0.9}}},
    )
    fig.update_xaxes(title_text="size (KiB)", row=2, col=1)
    fig.update_xaxes(title_text="latency (ms)", row=2, col=2)
    fig.update_yaxes(title_text=dense.metric, row=2, col=1)
    fig.update_yaxes(title_text=dense.metric, row=2, col=2)
    return fig


def html(points: Sequence[Point], dense: DenseBaseline, title: str) -> str:
    """The chart as one HTML page with plotly.js inside (about 5 MB): it renders offline and
    inside MLflow's sandboxed artifact viewer, where a CDN script would leave it blank."""
    return figure(points, dense, title).to_html(include_plotlyjs=True, full_html=True,
                                                config={"responsive": True, "displaylogo": False})


def png(points: Sequence[Point], dense: DenseBaseline, title: str) -> bytes:
    """A static picture of the front: accuracy vs size, accuracy vs latency, size vs latency."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.8), dpi=110, layout="constrained")
    axes = fig.subplots(1, 3)
    groups = _groups(points)
    panels = (("size_bytes", "accuracy", "size (KiB)", dense.metric),
              ("latency_ms", "accuracy", "latency (ms)", dense.metric),
              ("size_bytes", "latency_ms", "size (KiB)", "latency (ms)"))

    def value(p: Point | DenseBaseline, name: str) -> float:
        v = float(getattr(p, name))
        return v / 1024.0 if name == "size_bytes" else v

    for ax, (xname, yname, xlabel, ylabel) in zip(axes, panels, strict=True):
        for group, label, kwargs in (
            (DOMINATED, f"other trials ({len(groups[DOMINATED])})", {"s": 14, "alpha": 0.6}),
            (FRONT, f"Pareto front ({len(groups[FRONT])})", {"s": 26}),
        ):
            members = groups[group]
            ax.scatter([value(p, xname) for p in members], [value(p, yname) for p in members],
                       color=COLORS[group], label=label, **kwargs)
        members = groups[BASELINE]
        ax.scatter([value(p, xname) for p in members], [value(p, yname) for p in members], s=90,
                   facecolors="none", edgecolors=COLORS[BASELINE], marker="D", linewidths=1.5,
                   label=f"baselines ({len(members)})")
        ax.scatter([value(dense, xname)], [value(dense, yname)], s=160, marker="*", color=COLORS[DENSE],
                   label="dense model")
        if yname == "accuracy":
            xs, ys = _staircase(points, xname, _lower(dense))
            ax.plot(xs, ys, linestyle=":", linewidth=1, color=COLORS[FRONT])
        for p in groups[FRONT]:
            ax.annotate(str(p.trial), (value(p, xname), value(p, yname)), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ---- Markdown summary ----
#: Budgets of the summary, as fractions of the dense model's size or latency.
BUDGETS = (0.25, 0.5, 0.75, 1.0)


def best_within(points: Sequence[Point], size_bytes: float = float("inf"),
                latency_ms: float = float("inf"), exclude: int | None = None, lower: bool = False) -> Point | None:
    """The most accurate (``lower``: lowest-perplexity) feasible trial at most ``size_bytes`` and ``latency_ms``
    (ties: smaller, then faster)."""
    fits = [p for p in points if p.trial != exclude and p.feasible and p.size_bytes <= size_bytes
            and p.latency_ms <= latency_ms]
    sign = 1.0 if lower else -1.0
    return min(fits, key=lambda p: (sign * p.accuracy, p.size_bytes, p.latency_ms, p.trial)) if fits else None


def _cells(p: Point | None, dense: DenseBaseline) -> list[str]:
    if p is None:
        return ["none fits", "", "", "", ""]
    return [str(p.trial) + (" (baseline)" if p.baseline else ""), f"{p.accuracy:.4f}",
            f"{p.accuracy - dense.reference_accuracy:+.4f}", _pct(p.size_bytes, dense.size_bytes),
            _pct(p.latency_ms, dense.latency_ms)]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def summary_markdown(study: str, points: Sequence[Point], dense: DenseBaseline, *, failed: int,
                     hypervolume: float) -> str:
    """What the search found, in a page: budgets, baselines, the front."""
    front = sorted((p for p in points if p.on_front), key=lambda p: (p.size_bytes, p.latency_ms))
    baselines = [p for p in points if p.baseline]
    lines = [
        f"# Study `{study}`: Pareto front",
        "",
        f"{len(points)} complete trials, {failed} failed; **{len(front)} on the Pareto front**; "
        f"hypervolume **{hypervolume:.4f}** ({'1 / perplexity' if _lower(dense) else 'accuracy'} x fraction of "
        "the dense model's size and latency saved; "
        "1.0 would be a perfect, free model).",
        "",
        f"Dense model: {dense.metric} {dense.accuracy:.4f}, size {dense.size_bytes:,} B, latency "
        f"{dense.latency_ms:.4f} ms, {dense.params:,} parameters, {dense.macs:,} MACs.",
        "",
        *_accuracy_notes(points, dense),
        "Files: `pareto_front.html` (interactive chart), `pareto_front.png`, `pareto_front.csv`, "
        "`pareto_front.json`. Trials on the front carry the tag `pareto=true` and an MLflow model.",
        "",
        f"## Best {dense.metric} within a size budget",
        "",
    ]
    header = ["trial", dense.metric, "vs dense", "size", "latency"]
    lower = _lower(dense)
    sized = [best_within(points, size_bytes=f * dense.size_bytes, lower=lower) for f in BUDGETS]
    timed = [best_within(points, latency_ms=f * dense.latency_ms, lower=lower) for f in BUDGETS]
    lines += _table(["size at most", *header],
                    [[f"{100 * f:.0f}% of dense ({int(f * dense.size_bytes):,} B)",
                      *_cells(best, dense)] for f, best in zip(BUDGETS, sized, strict=True)])
    lines += ["", f"## Best {dense.metric} within a latency budget", ""]
    lines += _table(["latency at most", *header],
                    [[f"{100 * f:.0f}% of dense ({f * dense.latency_ms:.4f} ms)",
                      *_cells(best, dense)] for f, best in zip(BUDGETS, timed, strict=True)])
    lines += ["", "## Baselines (simple rules: uniform, global magnitude, global structured; and seeds)", ""]
    if baselines:
        rows = []
        for b in sorted(baselines, key=lambda p: p.trial):
            rival = best_within(points, b.size_bytes, b.latency_ms, exclude=b.trial, lower=lower)
            beats = ("none" if rival is None else
                     f"trial {rival.trial}: {dense.metric} {rival.accuracy:.4f} ({rival.accuracy - b.accuracy:+.4f})")
            rows.append([b.baseline or "", str(b.trial), f"{b.accuracy:.4f}", _pct(b.size_bytes, dense.size_bytes),
                         _pct(b.latency_ms, dense.latency_ms), "yes" if b.on_front else "no", beats])
        lines += _table(["baseline", "trial", dense.metric, "size", "latency", "on front",
                         "best other trial as small and as fast"], rows)
    else:
        lines.append("None in this study (set `study.baselines`, e.g. `[0.25, 0.5, 0.75]`).")
    lines += ["", "## The front", ""]
    tested = any(p.test_accuracy is not None for p in points)

    def test_cell(p: Point) -> list[str]:
        return [f"{p.test_accuracy:.4f}" if p.test_accuracy is not None else ""] if tested else []

    lines += _table(["trial", dense.metric, "vs dense", *([f"test {dense.metric}"] if tested else []), "size (B)",
                     "size",
                     "latency (ms)", "latency", "plan"],
                    [[str(p.trial) + (" (baseline)" if p.baseline else ""), f"{p.accuracy:.4f}",
                      f"{p.accuracy - dense.reference_accuracy:+.4f}", *test_cell(p), f"{p.size_bytes:,}",
                      _pct(p.size_bytes, dense.size_bytes), f"{p.latency_ms:.4f}",
                      _pct(p.latency_ms, dense.latency_ms), p.plan] for p in front])
    return "\n".join(lines) + "\n"


NO_TEST_SPLIT = "accuracy is validation accuracy; the front was selected on it (no test split given)"


def _accuracy_notes(points: Sequence[Point], dense: DenseBaseline) -> list[str]:
    """What the accuracies mean: the split they come from, the reference of drops, infeasible trials."""
    notes = []
    if any(p.test_accuracy is not None for p in points) or dense.test_accuracy is not None:
        line = ("Accuracy is validation accuracy, the split the front was selected on; **test accuracy** (front "
                "table) is measured on the held-out test split, never used to select")
        if dense.test_accuracy is not None:
            line += f" (dense model: {dense.test_accuracy:.4f}"
            if dense.finetuned_test_accuracy is not None:
                line += f", fine-tuned: {dense.finetuned_test_accuracy:.4f}"
            line += ")"
        notes.append(line + ".")
    else:
        notes.append(f"Note: {NO_TEST_SPLIT}.")
    if dense.finetuned_accuracy is not None:
        notes.append(f"Dense model fine-tuned with the trials' budget (nothing pruned): accuracy "
                     f"{dense.finetuned_accuracy:.4f}. Accuracy drops and 'vs dense' are measured against the "
                     f"better of the two ({dense.reference_accuracy:.4f}), so extra training is not counted as "
                     "recovery.")
    infeasible = sum(1 for p in points if not p.feasible)
    if infeasible:
        notes.append(f"{infeasible} complete trial(s) are infeasible (over a `space.constraints` limit): never on "
                     "the front nor in the budget tables.")
    if _lower(dense):  # the same notes, naming the objective the study has
        notes = [note.replace("Accuracy drops", "Perplexity increases").replace("accuracy", "perplexity")
                 .replace("Accuracy", "Perplexity") for note in notes]
    return [line for note in notes for line in (note, "")]
