"""Headless Debian Chromium driven by playwright, for the end-to-end tests of the dashboard.

Playwright never downloads a browser here (no ``playwright install``): it launches the system
Chromium at ``/usr/bin/chromium`` (Debian's ``chromium`` package; ``.ci/run`` installs it). A missing
browser or driver fails the test with the command that fixes it; it is never a skip.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
APT_INSTALL = "apt-get update && apt-get install -y --no-install-recommends chromium"
# Playwright adds --headless and a fresh, empty --user-data-dir itself. The network flags keep
# Chromium from calling home (updates, sync, field trials) on a closed network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 1000}
ARTIFACTS_ENV = "AIGC_TEST_ARTIFACTS"
# The screenshot folder of this session, printed in the terminal summary (tests/e2e/conftest.py).
SCREENSHOTS = pytest.StashKey[Path]()


def require_browser() -> None:
    """Fail (not skip) unless the system Chromium and the playwright package are both there."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the dashboard end-to-end test drives Debian's Chromium. "
            f"Install it with `{APT_INSTALL}` (as root), never with `playwright install`.",
            pytrace=False,
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(
            "the playwright package is missing: pip install -c constraints.txt -e '.[dev]'", pytrace=False
        )


def launch(playwright):
    """The system Chromium, headless, with the flags that work on a closed network."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def screenshot_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Where screenshots go: ``$AIGC_TEST_ARTIFACTS/<name>`` when set, else a fresh temp folder."""
    root = os.environ.get(ARTIFACTS_ENV)
    if root:
        folder = Path(root).expanduser().resolve() / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path_factory.mktemp(name)


def screenshot(page, folder: Path, name: str) -> Path:
    """A PNG of what the page shows now (the viewport: MLflow scrolls inside its own panes)."""
    path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.png"
    page.screenshot(path=str(path))
    return path
