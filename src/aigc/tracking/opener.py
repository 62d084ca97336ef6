"""Open a job's MLflow run in a child process, beside the driver's own start-up.

Why a process: importing MLflow takes ~1 s on an idle core here and opening the store and the run
a little more, all of it holding the GIL. In ``aigc train``'s driver that ran on the main thread
while Ray's start on another thread imported ``ray.train.torch`` (torch), so the two imports took
turns on one core: both done after 3.7-4.7 s, against 2.5 s with the run opened by a child process
on the other core (a /tmp script timing the two ways, 3 rounds each). The driver imports MLflow
only after ``trainer.fit()`` has been called, while the workers start.

Protocol: the request is one JSON object on the child's stdin (the arguments of
:func:`aigc.tracking.lifecycle.start_job_run`, plus the dataset for ``log_dataset_input``); the child
answers with one JSON line on stdout: ``{"run_id": ..., "experiment_id": ...}``, or ``{"error":
<exception class>, "message": ...}`` and exit status 1. MLflow's own messages (a new sqlite store's
migration) go to the child's stderr, which is the driver's. Everything the child does is what
``start_job_run`` does in-process: the store is checked first (a dead server fails in ~10 s), the
run is ended FAILED if its params cannot be logged.

    opener = RunOpener(uri, experiment, run_name, params, tags, dataset={...})   # starts the child
    ...                                    # the driver's own work
    run = opener.result()                  # JobRun; TrackingUnavailable / ValueError as in-process
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aigc.tracking.backend import TrackingUnavailable

__all__ = ["RunOpener"]

# Exceptions the child reports that the driver raises as themselves: what start_job_run raises for a
# store it cannot use (TrackingUnavailable) or an experiment it must not log to (ValueError).
_RERAISED: dict[str, type[Exception]] = {
    "TrackingUnavailable": TrackingUnavailable,
    "ValueError": ValueError,
}


class RunOpener:
    """:func:`aigc.tracking.lifecycle.start_job_run` (and ``log_dataset_input``) in a child process."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        dataset: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = uri
        request = {
            "uri": uri,
            "experiment": experiment,
            "run_name": run_name,
            "params": dict(params),
            "tags": dict(tags),
            "dataset": dict(dataset) if dataset else None,
        }
        # The child imports the same aigc as this process, wherever that came from (an install, a
        # Ray working-dir package, a path added at run time).
        package_parent = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "aigc.tracking.opener"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
        )
        assert self._proc.stdin is not None
        # The child reads its request before it imports anything, so this never waits on it for
        # long, whatever the request's size.
        self._proc.stdin.write(json.dumps(request))
        self._proc.stdin.close()
        self._answer: dict[str, Any] | None = None

    def result(self):
        """The opened run (:class:`aigc.tracking.lifecycle.JobRun`); raises what the child raised."""
        from aigc.tracking.lifecycle import JobRun

        answer = self._wait()
        if "error" in answer:
            kind = _RERAISED.get(answer["error"])
            if kind is not None:
                raise kind(answer["message"])
            error, message = answer["error"], answer["message"]
            raise RuntimeError(f"opening the MLflow run in {self.uri} failed: {error}: {message}")
        return JobRun(uri=self.uri, run_id=answer["run_id"], experiment_id=answer["experiment_id"])

    def abandon(self, error: BaseException) -> None:
        """The driver failed before it took the run: wait for the child, and end a run it opened
        FAILED (KILLED for an interrupt) with ``error`` in ``aigc.error``, never RUNNING."""
        try:
            answer = self._wait()
        except BaseException:  # noqa: BLE001 - a second failure must not hide the first
            self._proc.kill()
            return
        if "run_id" in answer:
            from aigc.tracking.lifecycle import end_run_with_error

            end_run_with_error(self.uri, answer["run_id"], error)

    def _wait(self) -> dict[str, Any]:
        if self._answer is None:
            assert self._proc.stdout is not None
            out = self._proc.stdout.read()
            code = self._proc.wait()
            lines = [line for line in out.splitlines() if line.startswith("{")]
            try:
                self._answer = json.loads(lines[-1])
            except (IndexError, ValueError):
                self._answer = {
                    "error": "RuntimeError",
                    "message": f"the child process exited with status {code} and no answer",
                }
        return self._answer


def main() -> int:
    request = json.loads(sys.stdin.read())  # before any import: the parent writes, then waits
    try:
        from aigc.tracking.backend import client_for
        from aigc.tracking.lifecycle import end_run_with_error, start_job_run
        from aigc.tracking.lineage import log_dataset_input

        run_id = start_job_run(
            request["uri"], request["experiment"], request["run_name"], request["params"], request["tags"]
        )
        client = client_for(request["uri"])
        try:
            if request["dataset"]:
                log_dataset_input(client, run_id, **request["dataset"])
            experiment_id = client.get_run(run_id).info.experiment_id
        except Exception as e:
            end_run_with_error(request["uri"], run_id, e)
            raise
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
        return 1
    print(json.dumps({"run_id": run_id, "experiment_id": experiment_id}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
