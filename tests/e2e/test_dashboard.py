"""The experiment dashboard end to end: a quickstart run, ``aigc ui`` on its store, a real browser.

The project of a real ``aigc quickstart`` (tests/conftest.py: a trained, evaluated diffusion run
registered as ``aigc-diffusion`` and promoted to ``production``); ``aigc ui`` serves its local store
on a free port; headless Debian Chromium (playwright, never ``playwright install``) opens the run's
pages and the registered model's, checks what they draw against the store, and saves a screenshot
of each page (the folder is printed; ``AIGC_TEST_ARTIFACTS`` chooses it). Everything started is
stopped by process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e_browser import SCREENSHOTS, VIEWPORT, launch, require_browser, screenshot, screenshot_dir

from aigc.tracking.server import ui_url

AIGC = str(Path(sys.executable).parent / "aigc")
MODEL = "aigc-diffusion"
ALIAS = "production"
METRIC = "train/loss"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def project_env(project: Path) -> dict[str, str]:
    """The environment of a user in ``project``: its default local store, whatever the caller's."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["AIGC_PROJECT_ROOT"] = str(project)
    return env


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group that ``proc`` leads (started with start_new_session), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; its children (mlflow's uvicorn worker) may still be shutting down.
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"aigc ui exited with {proc.returncode} early: {log}:\n{_tail(_read(log))}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"aigc ui did not answer {url} within {timeout:.0f} s; log {log}:\n{_tail(_read(log))}")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Dashboard:
    """The UI under test and what the store says it should show."""

    port: int  # aigc ui on http://127.0.0.1:PORT
    page: object  # one playwright Page (browser tab) for every test: the app loads once
    shots: Path  # screenshot folder
    run_id: str
    experiment_id: str
    version: str  # the model version at @production
    tags: dict[str, str]
    history: dict[int, float]  # train/loss by step
    sample: str  # a PNG sample grid artifact at the run's root, e.g. samples-final.png
    sample_size: tuple[int, int]
    page_errors: list[str] = field(default_factory=list)

    @property
    def run_path(self) -> str:
        return f"experiments/{self.experiment_id}/runs/{self.run_id}"

    def link(self, path: str) -> str:
        """The UI's page ``path`` as aigc prints its links (in the model-training view)."""
        return ui_url(path, "127.0.0.1", self.port)

    def open(self, url: str):
        """The tab at ``url``: a hash route of the loaded app, as when a user follows a link."""
        self.page.goto(url)
        return self.page


@pytest.fixture(scope="module")
def dashboard(request, tmp_path_factory, quickstart_project):
    require_browser()  # before minutes of training, not after
    from mlflow import MlflowClient
    from PIL import Image
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("dashboard")
    shots = screenshot_dir(tmp_path_factory, "dashboard-screenshots")
    request.config.stash[SCREENSHOTS] = shots  # tests/e2e/conftest.py prints it at the end
    print(f"dashboard screenshots: {shots}")

    t0 = time.monotonic()
    # tests/conftest.py: a project after a real `aigc quickstart` (shared with test_quickstart.py).
    project = quickstart_project["root"]
    print(f"quickstart project {project}, made in {quickstart_project['seconds']:.0f} s")
    db = project / "mlflow" / "mlflow.db"
    assert db.is_file(), f"the quickstart left no local store at {db}"

    port = _free_port()
    ui_log = tmp / "ui.log"
    with ui_log.open("w") as log:
        ui = subprocess.Popen(
            [AIGC, "ui", "--port", str(port), "--host", "127.0.0.1"],
            cwd=project,
            env=project_env(project),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pw = browser = board = None
    try:
        # What the pages must show, read from the store while the server starts.
        uri = f"sqlite:///{db}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        version = client.get_model_version_by_alias(MODEL, ALIAS)
        run = client.get_run(version.run_id)
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, METRIC)}
        assert len(history) >= 2, f"{METRIC} has {len(history)} point(s): no line to draw"
        pngs = [a.path for a in client.list_artifacts(run.info.run_id) if a.path.endswith(".png")]
        assert pngs, f"run {run.info.run_id} logged no PNG sample grid at its artifact root"
        sample = "samples-final.png" if "samples-final.png" in pngs else pngs[0]
        with Image.open(client.download_artifacts(run.info.run_id, sample, str(tmp))) as img:
            sample_size = img.size

        wait_until_answers(f"http://127.0.0.1:{port}/health", ui, ui_log)
        print(f"aigc ui (pid {ui.pid}) answers on port {port}, {time.monotonic() - t0:.0f} s in")
        pw = sync_playwright().start()
        browser = launch(pw)
        page = browser.new_context(viewport=VIEWPORT).new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
        board = Dashboard(
            port=port,
            page=page,
            shots=shots,
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            version=str(version.version),
            tags=dict(run.data.tags),
            history=history,
            sample=sample,
            sample_size=sample_size,
            page_errors=errors,
        )
        yield board
    finally:
        if board is not None and board.page_errors:
            print("uncaught errors in the UI's pages:\n" + "\n".join(board.page_errors))
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        stop_group(ui)
        print(f"aigc ui stopped; its log: {ui_log}")


def _field(page, label: str):
    """A field of the run overview's "About this run" box, e.g. "Source"."""
    return page.get_by_test_id(f"key-value-{label}")


def shown_source(tags: dict[str, str]) -> str:
    """What the run overview shows for ``mlflow.source.name``: MLflow's Utils.formatSource, i.e. the
    last path segment (extension dropped for an MLflow Project), the whole name for a job."""
    name = tags["mlflow.source.name"]
    kind = tags.get("mlflow.source.type", "")
    if kind == "JOB":
        return name
    base = name.split("/")[-1]
    if kind == "PROJECT":
        base = re.sub(r"(.*[^/])\.[^/.]+$", r"\1", base)
    return base


def _words(text: str) -> list[str]:
    """Letters and digits only: a markdown note and its rendered HTML give the same sequence, once
    link targets and tags are dropped."""
    text = re.sub(r"\]\([^)]*\)|<[^>]+>", " ", text)
    return re.findall(r"[A-Za-z0-9]+", text)


@contextlib.contextmanager
def opened(dashboard: Dashboard, url: str, shot: str):
    """The dashboard's tab at ``url``; its screenshot is saved on the way out, passed or failed."""
    page = dashboard.open(url)
    try:
        yield page
    finally:
        try:
            print(f"screenshot {screenshot(page, dashboard.shots, shot)}")
        except Exception as e:  # noqa: BLE001 - never hide the test's own failure
            print(f"no screenshot of {url}: {e}")


def test_run_overview_shows_the_runs_source_user_and_description(dashboard: Dashboard):
    from playwright.sync_api import expect

    checked, absent = [], []
    with opened(dashboard, dashboard.link(dashboard.run_path), "01-run-overview") as page:
        expect(_field(page, "Run ID")).to_contain_text(dashboard.run_id)
        # The fields are there whether or not the run has the tags behind them.
        for label in ("Source", "Created by"):
            expect(_field(page, label)).to_be_visible()
        tags = dashboard.tags
        if "mlflow.source.name" in tags:
            expect(_field(page, "Source")).to_contain_text(shown_source(tags))
            checked.append("mlflow.source.name")
        else:
            absent.append("mlflow.source.name")
        if "mlflow.user" in tags:
            expect(_field(page, "Created by")).to_contain_text(tags["mlflow.user"])
            checked.append("mlflow.user")
        else:
            absent.append("mlflow.user")
        if tags.get("mlflow.note.content", "").strip():
            box = page.locator('div:has(> h4 > button[aria-label="Edit description"])')
            note = box.get_by_test_id("note-editor-preview-content")
            expect(note).to_be_visible()
            want, shown = _words(tags["mlflow.note.content"]), _words(note.inner_text())
            assert " ".join(want) in " ".join(shown), (tags["mlflow.note.content"], note.inner_text())
            screenshot(box, dashboard.shots, "01-run-description")
            checked.append("mlflow.note.content")
        else:
            absent.append("mlflow.note.content")
        _field(page, "Run ID").scroll_into_view_if_needed()  # the page's screenshot: "About this run"
    print(f"run overview: checked {checked or 'none'}; tags absent from the run: {absent or 'none'}")


def test_train_loss_chart_is_drawn_from_the_runs_history(dashboard: Dashboard):
    from playwright.sync_api import expect

    with opened(dashboard, dashboard.link(f"{dashboard.run_path}/model-metrics"), "02-model-metrics") as page:
        page.get_by_placeholder("Search metric charts").fill(METRIC)
        # A chart card is titled with the metric key; cards render once in view.
        card = page.get_by_test_id("experiment-view-compare-runs-card").filter(
            has=page.locator(f'h4[title="{METRIC}"]')
        )
        expect(card).to_have_count(1)
        card.scroll_into_view_if_needed()
        plot = card.locator(".js-plotly-plot")
        expect(plot).to_be_visible()
        steps = sorted(dashboard.history)
        # Plotly keeps the figure's traces on its graph div: the chart plots the run's history.
        page.wait_for_function(
            "([gd, n]) => Array.isArray(gd.data) && gd.data.some(t => t.x && t.x.length === n)",
            arg=[plot.element_handle(), len(steps)],
        )
        traces = plot.evaluate("gd => gd.data.map(t => ({x: Array.from(t.x), y: Array.from(t.y)}))")
        want_y = [dashboard.history[s] for s in steps]
        assert any(t["x"] == steps and t["y"] == pytest.approx(want_y) for t in traces), (traces, steps)
        # ...and drew it: an SVG line through the points, not an empty container.
        line = card.locator(".scatterlayer .trace path.js-line").first
        expect(line).to_be_visible()
        points = [
            (float(x), float(y))
            for x, y in re.findall(r"[ML]\s*(-?[\d.]+)[ ,]\s*(-?[\d.]+)", line.get_attribute("d") or "")
        ]
        assert len(points) >= 2, line.get_attribute("d")
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        assert max(xs) - min(xs) > 10, points  # spans the step axis
        if len(set(want_y)) > 1:
            assert max(ys) - min(ys) > 1, points  # and follows the loss
        box = line.bounding_box()
        assert box and box["width"] > 10, box
        screenshot(card, dashboard.shots, "02-train-loss-chart")


def test_sample_grid_image_is_displayed(dashboard: Dashboard):
    from playwright.sync_api import expect

    # The artifacts tab opens a file from its path in the URL and previews images as <img>.
    url = dashboard.link(f"{dashboard.run_path}/artifacts/{dashboard.sample}")
    with opened(dashboard, url, "03-sample-grid") as page:
        img = page.locator(f'img[alt="{dashboard.sample}"]').first
        expect(img).to_be_visible()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
        size = img.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert tuple(size) == dashboard.sample_size, (size, dashboard.sample_size)


def test_registered_model_shows_the_production_alias(dashboard: Dashboard):
    from playwright.sync_api import expect

    alias = re.compile(rf"@\s*{ALIAS}")
    with opened(dashboard, dashboard.link(f"models/{MODEL}"), "04-registered-model") as page:
        row = (
            page.get_by_test_id("model-version-table")
            .get_by_role("row")
            .filter(has=page.locator(f'a[href$="/models/{MODEL}/versions/{dashboard.version}"]'))
        )
        expect(row).to_have_count(1)
        expect(row.locator(f'[title="{ALIAS}"]')).to_have_text(alias)

    url = dashboard.link(f"models/{MODEL}/versions/{dashboard.version}")
    with opened(dashboard, url, "05-model-version") as page:
        aliases = page.get_by_test_id("descriptions-item").filter(
            has=page.get_by_test_id("descriptions-item-label").filter(has_text="Aliases")
        )
        expect(aliases.locator(f'[title="{ALIAS}"]')).to_have_text(alias)


def test_the_experiment_opens_in_the_model_training_view(dashboard: Dashboard):
    """Through the links aigc prints, the experiment is a list of training runs with the model
    registry at hand, not MLflow's GenAI view (traces, judges, "Evaluation runs")."""
    from playwright.sync_api import expect

    with opened(dashboard, dashboard.link(f"experiments/{dashboard.experiment_id}"), "00-experiment") as page:
        expect(page.get_by_role("link", name="Model registry")).to_be_visible()
        expect(page.get_by_role("link", name=dashboard.tags["mlflow.runName"])).to_be_visible()
        expect(page.get_by_role("link", name="Judges")).to_have_count(0)
        expect(page.get_by_role("link", name="Evaluation runs")).to_have_count(0)
