"""The end-to-end tests name their screenshot folder in the terminal summary, passed or failed."""

from __future__ import annotations

from e2e_browser import SCREENSHOTS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    folder = config.stash.get(SCREENSHOTS, None)
    if folder is not None:
        terminalreporter.write_sep("-", "dashboard screenshots")
        terminalreporter.write_line(str(folder))
