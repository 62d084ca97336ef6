"""A sweep in the MLflow UI's compare view, in the real browser.

The session's one real ``aigc sweep`` (the ``asha_sweep`` fixture, tests/sweep_scenario.py: 4 tiny
trials over ``trainer.lr`` x ``model.base_channels``, ASHA, killed mid-way and resumed, into a sqlite
store; tests/integration/test_sweep.py asserts on the sweep itself), ``aigc ui`` on that store (it only
reads it), and headless Debian Chromium (``e2e_browser``, as ``test_dashboard.py``) on the compare page
of all the sweep's child runs: it must show each trial's searched params and its val/loss as the store
has them (none for the diverged trials ASHA killed), and draw the parallel-coordinates chart with an
axis per searched param and one for val/loss. A screenshot is saved (the folder is printed).
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

AIGC = str(Path(sys.executable).parent / "aigc")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# The cells of a row of the compare page's HTML tables (run names, params), by the row's header.
_ROW = """key => {
  for (const tr of document.querySelectorAll('tr')) {
    const th = tr.querySelector('th');
    if (th && th.innerText.trim() === key) {
      return Array.from(tr.querySelectorAll('td')).map(td => td.innerText.trim());
    }
  }
  return null;
}"""
# The cells a react-virtualized grid has rendered now: [top, left, text].
_CELLS = """el => Array.from(el.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div'))
  .map(c => [Math.round(c.offsetTop), Math.round(c.offsetLeft), c.innerText.trim()])"""
# The parallel-coordinates chart's axes: title -> [bottom end, top end] (plotly's extent labels).
_AXES = """() => Object.fromEntries(Array.from(document.querySelectorAll('.parcoords .y-axis')).map(a => [
  a.querySelector('.axis-title')?.textContent,
  [
    a.querySelector('.axis-extent-bottom-text')?.textContent,
    a.querySelector('.axis-extent-top-text')?.textContent,
  ],
]))"""


def _metrics_table(page) -> dict[str, list[str]]:
    """The compare page's metrics table, ``{metric: [cell per run column]}``: two virtualised grids
    (react-virtualized, 300 px high: names, values) whose cells exist only while scrolled into view,
    so each is read step by step. Cells are placed by their offsets (one 45 px row per metric)."""
    grids = []
    for grid in page.locator(".ReactVirtualized__Grid").all():
        cells: dict[tuple[int, int], str] = {}
        height = grid.evaluate("el => el.scrollHeight")
        for top in range(0, height + 150, 150):
            grid.evaluate(f"el => {{ el.scrollTop = {top}; }}")
            time.sleep(0.2)
            cells.update({(t, left): text for t, left, text in grid.evaluate(_CELLS)})
        grids.append(cells)
    names = next((g for g in grids if {left for _, left in g} == {0} and "val/loss" in g.values()), None)
    if names is None:
        return {}
    values = next(g for g in grids if g is not names)
    columns = sorted({left for _, left in values})
    return {name: [values.get((top, left), "") for left in columns] for (top, _), name in names.items()}


def _selected(page, box: str) -> list[str]:
    """What the chart's ``box`` select ("Parameters:" or "Metrics:") has chosen."""
    select = page.get_by_text(box).locator("xpath=following::*[contains(@class,'select')][1]")
    return select.locator("[class*='select-selection-item-content']").all_inner_texts()


def _choose(page, box: str, key: str) -> None:
    """Add ``key`` to the chart's ``box`` select as a user does (typed, Enter), unless it is chosen."""
    if key in _selected(page, box):
        return
    page.get_by_text(box).locator("xpath=following::*[contains(@class,'select')][1]").click()
    page.keyboard.type(key)
    page.get_by_text(key, exact=True).last.wait_for(state="attached")
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")


def test_the_compare_view_shows_the_trials_params_metric_and_parallel_coordinates(
    asha_sweep, tmp_path, tmp_path_factory, request
):
    require_browser()
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    shots = screenshot_dir(tmp_path_factory, "sweep-screenshots")
    request.config.stash[SCREENSHOTS] = shots
    uri, experiment = asha_sweep.uri, asha_sweep.experiment
    client = MlflowClient(uri)
    parent = client.search_runs([experiment], f"tags.`aigc.sweep.name` = '{asha_sweep.name}'")[0]
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    # The searched params, as the sweep's parent run records its space.
    searched = sorted(k.removeprefix("space.") for k in parent.data.params if k.startswith("space."))
    assert searched == ["model.base_channels", "trainer.lr"], parent.data.params
    params = {r.info.run_name: {k: r.data.params[k] for k in searched} for r in children}
    # A diverged trial logs no val/loss: the values the store has are the ones the page must show.
    losses = {r.info.run_name: r.data.metrics["val/loss"] for r in children if "val/loss" in r.data.metrics}
    assert losses, {r.info.run_name: r.data.metrics for r in children}

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
            for name in params:
                page.get_by_text(name, exact=True).first.wait_for()
            # The run-name, params and metrics tables fill in once the runs' data has arrived; the
            # columns are the runs, in the page's order (its "Run Name:" row).
            deadline = time.monotonic() + 30
            while True:
                shown = page.evaluate(_ROW, "Run Name:") or []
                rows = {k: page.evaluate(_ROW, k) for k in searched}
                metrics = _metrics_table(page)
                if sorted(shown) == sorted(params) and all(rows.values()) and "val/loss" in metrics:
                    break
                assert time.monotonic() < deadline, (shown, rows, metrics)
                time.sleep(1)
            # Each trial's searched params, as the store has them, in its own column.
            for key in searched:
                assert dict(zip(shown, rows[key], strict=True)) == {n: p[key] for n, p in params.items()}, key
            # Each trial's val/loss, in its column (the UI rounds: 3 decimals below 1, else 4
            # significant digits); the trials without one show none.
            cells = dict(zip(shown, metrics["val/loss"], strict=True))
            for name in params:
                if name in losses:
                    shown_loss = float(cells[name])
                    assert shown_loss == pytest.approx(losses[name], rel=1e-3, abs=5e-4), (name, cells)
                else:
                    assert cells[name] in ("", "NaN", "-"), (name, cells)
            # The parallel-coordinates chart (plotly's parcoords): an axis per searched param and
            # one for the metric, chosen in the chart's Parameters and Metrics boxes as a user does
            # (MLflow preselects up to 3 params that differ, and the first metric every run has).
            page.get_by_text("Parallel Coordinates Plot").first.click()
            page.locator(".parcoords").first.wait_for(state="attached")
            for key in searched:
                _choose(page, "Parameters:", key)
            _choose(page, "Metrics:", "val/loss")
            deadline = time.monotonic() + 30
            axes: dict[str, list[str]] = {}
            while not all(k in axes for k in [*searched, "val/loss"]) and time.monotonic() < deadline:
                time.sleep(0.5)
                axes = page.evaluate(_AXES)
            assert all(k in axes for k in [*searched, "val/loss"]), axes
            # Each axis spans the trials' values (plotly labels its ends with 5 decimals); MLflow
            # draws a run without the metric 0.01 above the metric's highest value.
            for key in searched:
                values = [float(p[key]) for p in params.values()]
                assert axes[key] == [f"{min(values):.5f}", f"{max(values):.5f}"], (key, axes)
            top = max(losses.values()) + (0.01 if len(losses) < len(params) else 0)
            assert axes["val/loss"] == [f"{min(losses.values()):.5f}", f"{top:.5f}"], axes
        finally:
            print(f"screenshot {screenshot(page, shots, 'sweep-compare')}")
    finally:
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        stop_group(ui)
