"""The MLflow UI, in a real browser (Debian's chromium through Playwright), on a real study:
the parent run's Pareto chart renders with every point, and filtering runs by
``tags.pareto = 'true'`` shows exactly the front's trials.

Needs /usr/bin/chromium (scripts/test.sh installs it when run as root); skipped without it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install chromium; scripts/test.sh does it as root)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow server at {url} not healthy after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s, the server we started (and its worker, in its own group)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # a worker left behind in the group we created
    except (ProcessLookupError, PermissionError):
        pass


def test_pareto_chart_and_front_filter_in_the_mlflow_ui(tiny_project: Path, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (test extra)")
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import create_trial

    from autoprune.config import load_config
    from autoprune.report import regenerate
    from autoprune.search import run_search
    from autoprune.study import BASELINE_ATTR
    from autoprune.workspace import Workspace

    started = time.monotonic()
    overrides = ["execution.backend=in_process", "study.baselines=[0.5]", "study.n_trials=5"]
    config = load_config(tiny_project, overrides)
    Workspace(config).tracker()  # create the MLflow store first, so the server can start while the study runs
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sets = [arg for item in overrides for arg in ("--set", item)]
    log = (tmp_path / "mlflow-server.log").open("w")
    # 'autoprune ui' prints the links and becomes 'mlflow server --workers 1' on 127.0.0.1 (same pid)
    server = subprocess.Popen([str(Path(sys.executable).parent / "autoprune"), "ui", str(tiny_project), *sets,
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "COLUMNS": "250"}, start_new_session=True)
    try:
        run_search(config)
        # A tiny study often puts every trial on the front; add one that is worse in every objective
        # (told to Optuna only, as after a crash) so the filter has something to hide. 'report' logs it.
        study = optuna.load_study(study_name=config.study.name, storage=config.storage_url)
        worst = {k: v for k, v in study.trials[0].user_attrs.items() if k != BASELINE_ATTR}
        worst.update(accuracy=0.0, size_bytes=10**9, latency_ms=10**3)
        study.add_trial(create_trial(values=[0.0, 1e9, 1e3], user_attrs=worst))
        summary = regenerate(Workspace(config))
        front = {row["trial"] for row in summary.front}
        assert summary.front and 5 not in front
        client = MlflowClient(config.tracking_uri)
        experiment = client.get_experiment_by_name(config.experiment_name).experiment_id
        children = {int(r.data.tags["autoprune.trial"]): r.info.run_id
                    for r in client.search_runs([experiment]) if r.data.tags.get("autoprune.role") == "trial"}
        wait_healthy(base, server)
        searched = time.monotonic()

        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                # 1. The parent run's chart artifact, by deep link: every point is there.
                context = browser.new_context(viewport={"width": 1500, "height": 1250})
                page = context.new_page()
                page.goto(f"{base}/#/experiments/{experiment}/runs/{summary.parent_run_id}/artifacts/"
                          "pareto_front.html?workflowType=machine_learning")
                chart = page.frame_locator("iframe.mlflow-html-iframe")
                chart.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=60_000)
                frame = next(f for f in page.frames if f.url.startswith("blob:"))
                lengths = dict(frame.evaluate(
                    "() => document.querySelector('.js-plotly-plot').data.map(t => [t.uid, t.x.length])"))
                assert lengths["front-3d"] == len(front)
                assert lengths["dominated-3d"] == 6 - len(front) >= 1
                baselines = sum(BASELINE_ATTR in t.user_attrs for t in study.trials)  # uniform and global rules
                assert baselines >= 2 and lengths["baseline-3d"] == baselines and lengths["dense-3d"] == 1
                assert lengths["front-size"] == lengths["front-latency"] == len(front)
                # 2-D points are SVG: they are drawn, not only in the data
                drawn = chart.locator(".scatterlayer path.point").count()
                assert drawn == 2 * (6 + baselines + 1)  # two panels: trials, baseline outlines, dense
                close = page.get_by_role("button", name="Close")  # the MLflow Assistant panel
                if close.count():
                    close.first.click()
                page.screenshot(path=str(tmp_path / "mlflow-pareto-chart.png"))
                context.close()

                # 2. Runs filtered by tags.pareto = 'true': exactly the front's trials under the study's row.
                context = browser.new_context(viewport={"width": 1500, "height": 1000})
                page = context.new_page()
                page.goto(f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"
                          "&searchFilter=tags.pareto%20%3D%20'true'")
                parent_row = page.locator(f"[role=row][row-id='{summary.parent_run_id}']").first
                parent_row.wait_for(timeout=60_000)
                parent_row.locator("button[data-component-id*='runnamecellrenderer']").first.click()
                wanted = {children[n] for n in front}
                page.locator(f"[role=row][row-id='{children[min(front)]}']").first.wait_for(timeout=30_000)
                shown = set(page.evaluate(
                    "() => [...document.querySelectorAll('[role=row][row-id]')].map(e => e.getAttribute('row-id'))"))
                assert shown - {summary.parent_run_id} == wanted
                assert children[5] not in shown
                for number in front:
                    assert page.get_by_text(f"trial-{number:04d}", exact=True).count() >= 1
                page.screenshot(path=str(tmp_path / "mlflow-pareto-runs.png"))
                context.close()
            finally:
                browser.close()
    finally:
        stop(server)
        log.close()
    assert server.poll() is not None
    output = (tmp_path / "mlflow-server.log").read_text()
    assert "MLFLOW_BACKEND_STORE_URI=" in output and "server --host" in output and "--workers 1" in output
    print(f"study + server {searched - started:.1f} s, browser {time.monotonic() - searched:.1f} s")
