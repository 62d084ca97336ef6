"""Driver-side progress: one line per job, polled from the job's MLflow run.

Polling MLflow (rather than reading worker files) works the same on a laptop and on a cluster,
where workers and the driver share nothing but the tracking server.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressPoller:
    """Polls ``train/loss`` and ``perf/samples_per_s`` every ``interval`` s in a daemon thread.

    ``callback`` receives ``{"step", "max_steps", "loss", "samples_per_s", "eta_s"}``; the default
    prints one line, rewritten in place on a terminal and appended every poll otherwise.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        max_steps: int,
        interval: float = 2.0,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.uri, self.run_id, self.max_steps, self.interval = uri, run_id, max_steps, interval
        self.callback = callback or self.print_line
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_step = -1
        self._tty = sys.stderr.isatty()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="aigc-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tty and self._last_step >= 0:
            sys.stderr.write("\n")

    def poll(self) -> dict[str, Any] | None:
        from aigc.tracking.backend import client_for

        client = client_for(self.uri)
        history = client.get_metric_history(self.run_id, "train/loss")
        if not history:
            return None
        last = max(history, key=lambda m: m.step)
        speed = client.get_run(self.run_id).data.metrics.get("perf/samples_per_s")
        first = min(history, key=lambda m: m.timestamp)
        eta = None
        if last.step > first.step:
            per_step = (last.timestamp - first.timestamp) / 1000 / (last.step - first.step)
            eta = per_step * max(0, self.max_steps - last.step)
        return {
            "step": last.step,
            "max_steps": self.max_steps,
            "loss": last.value,
            "samples_per_s": speed,
            "eta_s": eta,
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                state = self.poll()
            except Exception:  # noqa: BLE001 - progress is best effort; the run itself is the record
                continue
            if state and state["step"] != self._last_step:
                self._last_step = state["step"]
                self.callback(state)

    def print_line(self, s: dict[str, Any]) -> None:
        speed = f"{s['samples_per_s']:.0f} samples/s" if s.get("samples_per_s") else "-"
        eta = format_duration(s["eta_s"]) if s.get("eta_s") is not None else "--:--"
        line = f"step {s['step']}/{s['max_steps']}  loss {s['loss']:.4f}  {speed}  ETA {eta}"
        if self._tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
