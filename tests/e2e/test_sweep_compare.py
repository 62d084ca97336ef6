"""A sweep in the MLflow UI's compare view, in the real browser.

A real ``aigc sweep`` (3 tiny trials, FIFO, into a sqlite store), ``aigc ui`` on that store, and
headless Debian Chromium (``e2e_browser``, as ``test_dashboard.py``) on the compare page of the
sweep's child runs: it must show each trial's searched params and its metric as the store has them,
and draw the parallel-coordinates chart. Screenshots are saved (the folder is printed).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from e2e_browser import SCREENSHOTS, VIEWPORT, launch, require_browser, screenshot, screenshot_dir
from test_dashboard import _free_port, stop_group, wait_until_answers

from tiny import TINY

AIGC = str(Path(sys.executable).parent / "aigc")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _sweep(tmp: Path, dataset: Path) -> str:
    sets = [
        *TINY["diffusion"],
        f"data.location={dataset}",
        "data.batch_size=32",
        "data.num_workers=0",
        "trainer.max_steps=10",
        "trainer.log_every_steps=5",
        "trainer.val_every_steps=5",
        "trainer.limit_val_batches=2",
        "trainer.checkpoint_every_steps=10",
        "trainer.sample_every_steps=100",
        f"scaling.storage_path={tmp / 'runs'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "tracking.experiment=sweeps",
        "tracking.system_metrics=false",
    ]
    cmd = [
        AIGC,
        "sweep",
        str(ROOT / "models" / "diffusion.yaml"),
        "--param=trainer.lr=grid:0.001,0.002,0.004",
        "--trials=1",
        "--concurrent=2",
        "--workers=1",
        "--name=ui",
        *(f"--set={s}" for s in sets),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return f"sqlite:///{tmp / 'mlflow.db'}"


def _grid_text(page) -> str:
    """The text of every virtualised grid of the page, scrolled through."""
    parts = []
    for grid in page.locator(".ReactVirtualized__Grid").all():
        height = grid.evaluate("el => el.scrollHeight")
        for top in range(0, height + 150, 150):
            grid.evaluate(f"el => {{ el.scrollTop = {top}; }}")
            time.sleep(0.2)
            parts.append(grid.inner_text())
    return "\n".join(parts)


def test_the_compare_view_shows_the_trials_params_metric_and_parallel_coordinates(
    digits_dataset, tmp_path, tmp_path_factory, request
):
    require_browser()
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    shots = screenshot_dir(tmp_path_factory, "sweep-screenshots")
    request.config.stash[SCREENSHOTS] = shots
    uri = _sweep(tmp_path, digits_dataset)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweeps").experiment_id
    parent = client.search_runs([experiment], "tags.`aigc.sweep.name` = 'ui'")[0]
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    lrs = {r.info.run_name: r.data.params["trainer.lr"] for r in children}
    losses = {r.info.run_name: r.data.metrics["val/loss"] for r in children}

    port = _free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as f:
        ui = subprocess.Popen(
            [AIGC, "ui", "--port", str(port), "--host", "127.0.0.1", "--uri", uri],
            cwd=tmp_path,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pw = browser = None
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/health", ui, log)
        pw = sync_playwright().start()
        browser = launch(pw)
        page = browser.new_context(viewport=VIEWPORT).new_page()
        page.set_default_timeout(30_000)
        ids = json.dumps([r.info.run_id for r in children])
        query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([experiment])})
        page.goto(f"http://127.0.0.1:{port}/#/compare-runs?{query}")
        try:
            for name in lrs:
                page.get_by_text(name, exact=True).first.wait_for()
            # The page's text, and its virtualised grids (300 px, react-virtualized: the metrics
            # table), whose rows exist only while scrolled into view: each is read step by step.
            text, deadline = "", time.monotonic() + 30
            while not ("trainer.lr" in text and "val/loss" in text) and time.monotonic() < deadline:
                time.sleep(1)  # the tables fill in once the runs' data has arrived
                text = page.locator("body").inner_text() + "\n" + _grid_text(page)
            assert "trainer.lr" in text and "val/loss" in text, text[-3000:]
            for name, lr in lrs.items():
                assert lr in text or f"{float(lr):.5f}" in text, (name, lr)
            for name, loss in losses.items():
                assert f"{loss:.3g}" in text, (name, loss)  # the UI shows 3 significant digits
            # The parallel-coordinates chart (plotly's parcoords): an axis per searched param and
            # one for the metric, chosen in its Metrics box as a user does.
            page.get_by_text("Parallel Coordinates Plot").first.click()
            page.locator(".parcoords").first.wait_for(state="attached")
            select = "xpath=following::*[contains(@class,'select')][1]"
            page.get_by_text("Metrics:").locator(select).click()
            page.keyboard.type("val/loss")
            page.get_by_text("val/loss", exact=True).last.wait_for(state="attached")
            page.keyboard.press("Enter")
            page.keyboard.press("Escape")
            deadline = time.monotonic() + 30
            labels: list[str] = []
            while "val/loss" not in labels and time.monotonic() < deadline:
                time.sleep(0.5)
                labels = page.locator(".parcoords text").evaluate_all("els => els.map(e => e.textContent)")
            assert "trainer.lr" in labels and "val/loss" in labels, labels
            # The metric's axis spans the trials' values (plotly labels its ends with 5 decimals).
            assert f"{min(losses.values()):.5f}" in labels and f"{max(losses.values()):.5f}" in labels, labels
        finally:
            print(f"screenshot {screenshot(page, shots, 'sweep-compare')}")
    finally:
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        stop_group(ui)
