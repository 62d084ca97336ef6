"""Following a registry alias inside a serving replica, off the request path.

Each replica loads the version its reference names once at start-up, then a daemon thread asks the
registry every ``poll_interval_s`` which version the alias names (``get_model_version_by_alias``:
about 2 ms on sqlite, about 11 ms against ``mlflow server`` on 127.0.0.1). When the alias has
moved, the thread loads the new version (seconds) while requests keep going to the old one, then
swaps one reference to a :class:`Loaded` (module and version together). Requests read that
reference once and use what they got, so a request never sees one version's module with another's
number, and no request waits for a load.

The alternatives stall requests for the whole load (measured with a 3-6 s load, ray 2.60): a
``user_config`` redeploy through ``reconfigure()`` stops the replica taking requests while it runs
(5.6-8.4 s), and a rolling redeploy with one replica stops the old replica before the new one is
ready (9-12.6 s); a client timeout shorter than that fails requests.

When the registry cannot be reached, or the alias is deleted, or a new version fails to load, the
replica keeps serving what it has and :meth:`AliasFollower.health` says what went wrong and when
the last poll succeeded. A version that failed to load is tried again after ``retry_failed_s``,
not at every poll (a load costs seconds of CPU that serving needs). The MLflow client must be set
up not to retry for minutes on an unreachable server (see ``aigc.serving.app.replica_env``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aigc.registry.versions import ModelRef

log = logging.getLogger("aigc.serving")


@dataclass(frozen=True)
class Loaded:
    """The module a replica serves and the registry version it came from."""

    module: Any
    version: str
    loaded_at: float  # time.time()


class AliasFollower:
    """Serves ``ref``'s version and follows ``ref.alias`` when it moves.

    ``resolve(ref) -> ModelVersion`` and ``load(ModelVersion) -> module`` are the registry calls
    (``aigc.registry.versions.resolve_version`` / ``load_version`` in a replica; fakes in unit tests).
    A reference to a fixed version (``aigc-diffusion/3``) is loaded once and not followed.
    """

    def __init__(
        self,
        ref: ModelRef,
        resolve: Callable[[ModelRef], Any],
        load: Callable[[Any], Any],
        poll_interval_s: float = 2.0,
        retry_failed_s: float = 30.0,
        logger: logging.Logger | None = None,
    ):
        self.ref = ref
        self._resolve = resolve
        self._load = load
        self.poll_interval_s = float(poll_interval_s)
        self.retry_failed_s = float(retry_failed_s)
        self.log = logger or log
        self._current: Loaded | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.alias_version: str | None = None  # what the alias named at the last successful poll
        self.last_ok_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.polls = 0
        self.swaps = 0
        self._failed: tuple[str, float] | None = None  # (version, when) of the last failed load

    @property
    def following(self) -> bool:
        return self.ref.alias is not None

    @property
    def current(self) -> Loaded:
        """The served ``(module, version)``: read it once per request (it may be swapped any time)."""
        if self._current is None:
            raise RuntimeError("AliasFollower.start() has not loaded a model yet")
        return self._current

    def start(self) -> Loaded:
        """Load the version the reference names now (raises if it cannot), then start following."""
        version = self._resolve(self.ref)
        number = str(version.version)
        self._current = Loaded(self._load(version), number, time.time())
        self.alias_version = number
        self.last_ok_at = time.time()
        if self.following and self.poll_interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="aigc-alias-follower", daemon=True)
            self._thread.start()
        return self._current

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            self.poll_once()

    def poll_once(self) -> None:
        """One look at the alias; loads and swaps in a new version. Never raises."""
        self.polls += 1
        try:
            version = self._resolve(self.ref)
        except Exception as err:  # unreachable store, deleted alias: keep serving what we have
            self._error(f"polling {self.ref}: {_one_line(err)}")
            return
        number = str(version.version)
        self.alias_version = number
        if number == self.current.version:
            self._ok()
            return
        if self._failed and self._failed[0] == number and time.time() - self._failed[1] < self.retry_failed_s:
            return  # the error of that load stands until the retry is due
        served = self.current.version
        self.log.info("%s moved to v%s: loading it, serving v%s meanwhile", self.ref, number, served)
        t0 = time.perf_counter()
        try:
            module = self._load(version)
        except Exception as err:
            self._failed = (number, time.time())
            self._error(f"loading {self.ref.name} version {number}: {_one_line(err)}")
            return
        self._current = Loaded(module, number, time.time())  # the one atomic swap
        self._failed = None
        self.swaps += 1
        seconds = time.perf_counter() - t0
        self.log.info("serving %s version %s (loaded in %.1f s)", self.ref.name, number, seconds)
        self._ok()

    def _ok(self) -> None:
        self.last_ok_at = time.time()

    def _error(self, message: str) -> None:
        self.log.warning("%s", message)
        self.last_error, self.last_error_at = message, time.time()

    def healthy(self) -> bool:
        """The last poll succeeded and the served version is the one the alias names."""
        if not self.following:
            return True
        latest_ok = self.last_ok_at or 0.0
        return (self.last_error_at is None or latest_ok > self.last_error_at) and (
            self.alias_version == self.current.version
        )

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` reports about the model and about following its alias."""
        now = time.time()
        loaded = self.current
        out: dict[str, Any] = {
            "model": self.ref.name,
            "alias": self.ref.alias,
            "version": loaded.version,
            "loaded_at": _iso(loaded.loaded_at),
        }
        if not self.following:
            out["following"] = {"enabled": False}
            return out
        out["following"] = {
            "enabled": True,
            "healthy": self.healthy(),
            "alias_version": self.alias_version,
            "poll_interval_s": self.poll_interval_s,
            "polls": self.polls,
            "swaps": self.swaps,
            "last_success_at": _iso(self.last_ok_at),
            "last_success_age_s": None if self.last_ok_at is None else round(now - self.last_ok_at, 3),
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
        }
        return out


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"
