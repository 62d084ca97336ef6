"""Rank-0 logging inside a Ray worker: metrics, tags and sample grids that never stall training.

``log_metrics``/``log_image``/``set_tags`` only put work on a queue; one background thread drains
it, coalescing metrics into ``log_batch`` calls (at most 1000 per request, MLflow's limit) at most
every ``flush_interval_s``. A slow or dead tracking server therefore costs the training loop nothing;
metrics that do not fit in the bounded queue are dropped and counted rather than blocking.

A request that fails for a reason that may pass (no connection, a timeout, a 5xx or 429 answer:
the server restarting, a network blip) is tried again, with back-off from ``retry_initial_s`` up
to ``retry_max_s``, and nothing queued behind it is sent before it: order is kept, and what was
logged during an outage arrives once the server answers. (MLflow's client retries a request on its
own too, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``; with those off, a failed batch used to be lost.) A
request the server rejects (4xx) is dropped and counted in ``lost``. When the server has not taken
a request for ``give_up_after_s`` seconds the logger gives up: what is pending is counted in
``lost``, and the next ``log_*``/``set_tags``/``flush`` call raises :class:`TrackingUnavailable`
naming the server, so a job whose tracking server is gone for good fails clearly (its checkpoints
kept, to be resumed) instead of finishing with a hole in its metrics or waiting forever. The bound
is ``give_up_after_s`` plus one request's own time (MLflow's retries and
``MLFLOW_HTTP_REQUEST_TIMEOUT``).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag

from aigc.tracking.backend import TrackingUnavailable, client_for
from aigc.tracking.params import MAX_KEY_LENGTH, MAX_TAG_VALUE_LENGTH, chunked, truncate

_log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow 3.17 rejects larger log_batch requests
# MLflow's rule for metric and image keys.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-./ :]+$")


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"metric/image key {key!r} is invalid: use 1..{MAX_KEY_LENGTH} letters, digits, "
            "spaces and _ - . / :"
        )
    return key


class NullRunLogger:
    """The logger on ranks other than 0 (and with tracking off): every call does nothing."""

    enabled = False

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Discard ``metrics``."""

    def log_image(self, image: Any, key: str = "samples", step: int = 0) -> None:
        """Discard ``image``."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Discard ``tags``."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Do nothing."""

    def flush(self, timeout: float | None = None) -> bool:
        """Nothing to flush: always True."""
        return True

    def close(self, timeout: float = 30.0) -> bool:
        """Nothing to close: always True."""
        return True

    def __enter__(self) -> NullRunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunLogger(NullRunLogger):
    """Logs to an existing run (created by the driver) from rank 0 of a training job.

    ``RunLogger(uri, run_id)``; on every rank use ``RunLogger.for_rank(rank, uri, run_id)``, which
    gives a ``NullRunLogger`` off rank 0. ``system_metrics=True`` starts MLflow's system metrics
    monitor (CPU, memory, disk, network, and GPU when pynvml is present) on this run, sampled every
    ``system_metrics_interval_s`` seconds as ``system/...`` metrics. Counters ``batches_sent``,
    ``metrics_sent``, ``dropped`` (queue full), ``errors`` (failed requests, retried or not) and
    ``lost`` (values never sent) say what happened; ``failure`` says why the logger gave up.
    """

    enabled = True

    def __init__(
        self,
        uri: str,
        run_id: str,
        *,
        flush_interval_s: float = 1.0,
        max_queue: int = 10_000,
        system_metrics: bool = False,
        system_metrics_interval_s: float = 10.0,
        node_id: str | None = None,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 15.0,
        give_up_after_s: float = 300.0,
    ) -> None:
        self.uri = uri
        self.run_id = run_id
        self.flush_interval_s = flush_interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.give_up_after_s = give_up_after_s
        self._client = client_for(uri)
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self.batches_sent = 0
        self.metrics_sent = 0
        self.dropped = 0
        self.errors = 0
        self.lost = 0  # values the server rejected, or still unsent when the logger gave up
        self.replayed = 0  # values not sent: their step was logged before a resume (_not_logged_before)
        self._logged_upto: dict[str, int] = {}  # key -> last step the run had when first sent here
        self.failure: str | None = None  # why the logger gave up (see the module docstring)
        self._failing_since: float | None = None
        self._rejected: Exception | None = None  # the last error a request was dropped for
        self._thread = threading.Thread(target=self._drain, name=f"aigc-mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()
        self._monitor = None
        if system_metrics:
            self._monitor = self._start_system_metrics(system_metrics_interval_s, node_id)

    @classmethod
    def for_rank(cls, rank: int, uri: str | None, run_id: str | None, **kwargs: Any) -> NullRunLogger:
        """A ``RunLogger`` on rank 0, a ``NullRunLogger`` elsewhere or when there is no run."""
        if rank != 0 or not uri or not run_id:
            return NullRunLogger()
        return cls(uri, run_id, **kwargs)

    # ----------------------------------------------------------------------------- caller side

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue ``metrics`` (name → number, e.g. ``{"train/loss": 0.3}``) at ``step``; never blocks.

        Values are converted with ``float()`` here (0-d tensors work), so a bad value raises now,
        naming its key, instead of failing a whole batch later.
        """
        self._check_open()
        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as e:
                raise TypeError(f"metric {key!r} has a non-numeric value {value!r}") from e
            entries.append(Metric(_check_key(key), number, timestamp, int(step)))
        if entries:
            self._offer(("metrics", entries), len(entries))

    def log_image(self, image: Any, key: str = "samples", step: int = 0) -> None:
        """Queue an image for the UI's image-over-steps view (``client.log_image(key=, step=)``).

        ``image`` is a ``PIL.Image`` or a numpy array ``(H, W)``, ``(H, W, 1|3|4)`` (uint8 0..255 or
        float 0..1). It is converted and copied now, so the caller may reuse its buffer.
        """
        import numpy as np
        import PIL.Image

        self._check_open()
        if isinstance(image, np.ndarray):
            from mlflow.tracking.multimedia import convert_to_pil_image

            image = convert_to_pil_image(image)  # validates shape/range and copies
        elif isinstance(image, PIL.Image.Image):
            image = image.copy()
        else:
            raise TypeError(f"log_image expects a PIL.Image or numpy array, got {type(image).__name__}")
        self._offer(("image", image, _check_key(key), int(step), int(time.time() * 1000)), 1)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Queue run tags (name → text, cut to MLflow's 8000 characters), sent after the metrics
        queued before them; never blocks. A later value of a tag replaces the earlier one."""
        self._check_open()
        entries = [RunTag(k, truncate(str(v), MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()]
        if entries:
            self._offer(("tags", entries), len(entries))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder now (synchronous: callers log artifacts rarely and may delete the
        file afterwards), tried again while the server is away like every other request: this waits
        up to ``give_up_after_s`` for it. Raises ``FileNotFoundError`` naming ``path`` if it does not
        exist, the server's error if it rejects the upload, :class:`TrackingUnavailable` if the
        logger gives up on the server."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        self._check_open()
        upload = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        if not self._call(1, upload, self.run_id, str(path), artifact_path):
            self._raise_if_failed()
            raise self._rejected or TrackingUnavailable(f"MLflow did not take artifact {path}")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far has been sent (or dropped); False on timeout.

        Raises :class:`TrackingUnavailable` if the logger gave up on the server (see the module
        docstring): a server that stays away makes this return within ``give_up_after_s`` plus one
        request's time, whatever ``timeout`` says."""
        if self._closed or not self._thread.is_alive():
            self._raise_if_failed()
            return self._queue.empty()
        done = threading.Event()
        try:
            self._queue.put(("flush", done), timeout=timeout)
        except queue.Full:
            return False
        flushed = done.wait(timeout)
        self._raise_if_failed()
        return flushed

    def close(self, timeout: float = 30.0) -> bool:
        """Send what is queued, stop the background thread and the system metrics monitor.

        Idempotent. Returns False if the queue could not be drained within ``timeout`` (the thread
        is a daemon, so a dead server never keeps the worker process alive).
        """
        if self._closed:
            return not self._thread.is_alive()
        self._closed = True
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001 - monitoring must not fail the job
                _log.warning("stopping MLflow system metrics failed", exc_info=True)
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(("stop",), timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(max(deadline - time.monotonic(), 0))
        if self.dropped:
            _log.warning(
                "RunLogger dropped %d metric values for run %s (queue full)", self.dropped, self.run_id
            )
        if self.lost:
            _log.warning("RunLogger could not send %d values of run %s", self.lost, self.run_id)
        return not self._thread.is_alive()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"RunLogger for run {self.run_id} is closed")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise TrackingUnavailable(self.failure)

    def _offer(self, item: tuple[Any, ...], count: int) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if not self.dropped:
                _log.warning("MLflow logging queue full for run %s: dropping values", self.run_id)
            self.dropped += count

    def _start_system_metrics(self, interval_s: float, node_id: str | None) -> Any:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=interval_s, tracking_uri=self.uri, node_id=node_id
            )
            monitor.start()
            return monitor
        except Exception:  # noqa: BLE001 - e.g. psutil missing: train without system metrics
            _log.warning("MLflow system metrics unavailable; continuing without them", exc_info=True)
            return None

    # --------------------------------------------------------------------------- background side

    def _drain(self) -> None:
        pending: list[Metric] = []
        deadline: float | None = None  # when the oldest pending metric must be sent
        while True:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                self._send_metrics(pending)
                deadline = None
                continue
            kind = item[0]
            if kind == "metrics":
                pending.extend(item[1])
                if deadline is None:
                    deadline = time.monotonic() + self.flush_interval_s
                if len(pending) >= MAX_METRICS_PER_BATCH:
                    self._send_metrics(pending)
                    deadline = None
                continue
            # Anything else is sent after the metrics queued before it, to keep the order.
            self._send_metrics(pending)
            deadline = None
            if kind == "image":
                _, image, key, step, timestamp = item
                self._call(
                    1, self._client.log_image, self.run_id, image, key=key, step=step, timestamp=timestamp
                )
            elif kind == "tags":
                self._call(len(item[1]), self._client.log_batch, self.run_id, tags=item[1])
            elif kind == "flush":
                item[1].set()
            elif kind == "stop":
                return

    def _send_metrics(self, pending: list[Metric]) -> None:
        pending[:] = self._not_logged_before(pending)
        for batch in chunked(pending, MAX_METRICS_PER_BATCH):
            if self._call(len(batch), self._client.log_batch, self.run_id, metrics=batch):
                self.batches_sent += 1
                self.metrics_sent += len(batch)
        pending.clear()

    def _not_logged_before(self, pending: list[Metric]) -> list[Metric]:
        """``pending`` without the values at steps the run already had for their key when this
        logger first sent that key. A resumed job (``aigc train --resume``, a worker group restarted
        from its last checkpoint, a sweep's trial continued) trains again the steps after its
        checkpoint and logs them again; kept, the run would hold two values at one step (ray#48664
        with Ray's MLflow callback). The first value at a step wins: the replayed steps restart from
        the checkpoint's state, so they repeat it. One history request per key and launch, on this
        thread; a key whose history cannot be read is sent unfiltered (and asked again next time)."""
        out = []
        for m in pending:
            last = self._logged_upto.get(m.key)
            if last is None:
                try:
                    history = self._client.get_metric_history(self.run_id, m.key)
                except Exception:  # noqa: BLE001 - the send below retries and reports the store's state
                    out.append(m)
                    continue
                last = self._logged_upto[m.key] = max((h.step for h in history), default=-1)
            if m.step > last:
                out.append(m)
            else:
                self.replayed += 1
        return out

    def _call(self, count: int, fn: Any, *args: Any, **kwargs: Any) -> bool:
        """Send one request of ``count`` values, again and again while it fails for a reason that
        may pass (see the module docstring); False, the values counted in ``lost``, when the server
        rejects it or the logger gives up. Never raises: the caller side raises after a give-up."""
        name = getattr(fn, "__name__", fn)
        delay = self.retry_initial_s
        while self.failure is None:
            try:
                fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - a logging failure must never kill this thread
                self.errors += 1
                if not _may_pass(err):
                    self._rejected = err
                    _log.warning("MLflow %s rejected for run %s; dropped", name, self.run_id, exc_info=True)
                    break
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = now
                    _log.warning(
                        "MLflow %s failed for run %s (%s: %s); trying again until the server answers "
                        "(up to %.0f s)", name, self.run_id, type(err).__name__, err, self.give_up_after_s,
                    )  # fmt: skip
                down_s = now - self._failing_since
                if down_s >= self.give_up_after_s:
                    self.failure = (
                        f"MLflow tracking server {self.uri} did not answer run {self.run_id} for "
                        f"{down_s:.0f} s (last error: {type(err).__name__}: {str(err)[:300]}); "
                        f"{self.lost + count} metric values and other logs could not be sent. The "
                        "job's checkpoints are kept: resume it once the server answers "
                        "(aigc train --resume NAME)."
                    )
                    _log.error("%s", self.failure)
                    break
                time.sleep(min(delay, self.give_up_after_s - down_s))
                delay = min(delay * 2, self.retry_max_s)
                continue
            if self._failing_since is not None:
                _log.warning(
                    "MLflow answers run %s again after %.1f s",
                    self.run_id,
                    time.monotonic() - self._failing_since,
                )
                self._failing_since = None
            return True
        self.lost += count
        return False


def _may_pass(err: Exception) -> bool:
    """Whether a failed request is worth another try: anything but an answer refusing it (4xx)."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status >= 500 or status == 429
    return True
