"""Take the MLflow screenshots in docs/ from a finished study (Debian's chromium + Playwright).

    .venv/bin/python docs/screenshots.py search_spaces/digits_cnn.yaml [--set KEY=VALUE ...]

Starts ``autoprune ui`` on a free port, opens the parent run's Pareto chart and the runs
filtered by ``tags.pareto = 'true'``, writes docs/mlflow-pareto.png and docs/mlflow-front-runs.png,
and stops the server.
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

from playwright.sync_api import sync_playwright

from autoprune.config import load_config
from autoprune.tracking import find_parent

DOCS = Path(__file__).resolve().parent
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def close_assistant(page) -> None:
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def main(argv: list[str]) -> None:
    config_path, overrides = argv[0], [v for k, v in zip(argv[1::2], argv[2::2], strict=False) if k == "--set"]
    config = load_config(Path(config_path), overrides)
    found = find_parent(config.tracking_uri, config.experiment_name, config.study.name)
    if found is None:
        raise SystemExit(f"no MLflow run for study {config.study.name!r}: run the search first")
    experiment, run = found
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "autoprune"), "ui", *argv, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(180):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
            page = browser.new_context(viewport={"width": 1440, "height": 1300}).new_page()
            page.goto(f"{base}/#/experiments/{experiment}/runs/{run}/artifacts/pareto_front.html"
                      "?workflowType=machine_learning")
            page.frame_locator("iframe.mlflow-html-iframe").locator(".js-plotly-plot .main-svg").first.wait_for(
                timeout=60_000)
            close_assistant(page)
            time.sleep(1)
            page.screenshot(path=str(DOCS / "mlflow-pareto.png"))
            page = browser.new_context(viewport={"width": 1440, "height": 800}).new_page()
            page.goto(f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"
                      "&searchFilter=tags.pareto%20%3D%20'true'")
            row = page.locator(f"[role=row][row-id='{run}']").first
            row.wait_for(timeout=60_000)
            row.locator("button[data-component-id*='runnamecellrenderer']").first.click()
            page.get_by_text("trial-", exact=False).first.wait_for(timeout=30_000)
            close_assistant(page)
            time.sleep(1)
            page.screenshot(path=str(DOCS / "mlflow-front-runs.png"))
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"wrote {DOCS / 'mlflow-pareto.png'} and {DOCS / 'mlflow-front-runs.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
