"""``aigc sweep`` on the embedded Ray with a real MLflow sqlite store: a 4-trial ASHA sweep, 2 at a
time, on a scripted-bad learning rate, killed mid-way and resumed.

One sweep serves every assertion, and the compare view's browser test as well
(tests/e2e/test_sweep_compare.py): the session fixture ``asha_sweep`` (tests/sweep_scenario.py) runs
it once per session. The command runs in its own process group, is killed (SIGKILL to the group, as a
crash would) once two trials have ended, then ``aigc sweep --resume`` finishes it and registers the
best trial.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_asha_sweep_killed_midway_resumes_into_the_same_runs(asha_sweep):
    name, good_lr, bad_lr = asha_sweep.name, asha_sweep.good_lr, asha_sweep.bad_lr
    lines, killed_at = asha_sweep.lines, asha_sweep.killed_at
    # Two trials opened their runs at once without failing (the sweep logs their dataset first).
    assert sum("] failed" in line for line in lines) == 0, "\n".join(lines)
    assert sum("] started: trainer.lr=" in line for line in lines) >= 2
    client = MlflowClient(asha_sweep.uri)
    experiment = client.get_experiment_by_name("sweeps").experiment_id
    # The store right after the kill, before the resume.
    parents = asha_sweep.runs_at_kill
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "RUNNING"  # the driver died with it
    assert parent.data.params["space.trainer.lr"] == f"grid:{good_lr},{bad_lr}"
    assert parent.data.params["sweep.scheduler"] == "asha"
    assert parent.data.params["sweep.metric"] == "val/loss" and parent.data.params["sweep.mode"] == "min"
    assert parent.data.params["sweep.trials"] == "2" and parent.data.params["sweep.concurrent"] == "2"

    resumed = asha_sweep.resumed
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    text = resumed.stdout
    print(f"killed after {killed_at:.0f} s; resumed in {asha_sweep.resumed_seconds:.0f} s")
    print("\n".join(lines) + "\n--- resumed ---\n" + text)

    # One parent run, FINISHED; exactly 4 child runs nested under it (no duplicate on the resume).
    parents = client.search_runs([experiment], f"tags.`aigc.sweep.name` = '{name}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_name = {r.data.tags["aigc.run.name"]: r for r in children}
    assert sorted(by_name) == [f"{name}-t000", f"{name}-t001", f"{name}-t002", f"{name}-t003"]
    assert all(r.info.run_name == n for n, r in by_name.items())  # the UI shows the trial's name
    assert not [r for r in children if r.info.status == "RUNNING"]
    # ASHA stopped at least one trial, each on the bad learning rate; a stopped run is KILLED and
    # says so; the good ones finished.
    stopped = [r for r in children if r.data.tags.get("aigc.sweep.stopped") == "asha"]
    assert stopped, {n: (r.info.status, r.data.tags.get("aigc.sweep.stopped")) for n, r in by_name.items()}
    for r in stopped:
        assert r.info.status == "KILLED"
        assert float(r.data.params["trainer.lr"]) == bad_lr
    # The good trials finished. (A bad one that reaches each rung before any other trial has a value
    # there is not stopped: ASHA is asynchronous; t003 starts after t000 has finished, so ASHA has
    # t000's values at every rung by then and stops it at its first.)
    good = [r for r in children if float(r.data.params["trainer.lr"]) == good_lr]
    assert len(good) == 2 and all(r.info.status == "FINISHED" for r in good)
    assert by_name[f"{name}-t003"].info.run_id in {r.info.run_id for r in stopped}
    finished = [r for r in children if r.info.status == "FINISHED" and "val/loss" in r.data.metrics]
    # A diverged run logs no val/loss: the finished runs with a value are the good ones.
    assert {r.info.run_id for r in finished} == {r.info.run_id for r in good}
    # The parent's best trial is the finished child with the lowest val/loss (the first by name
    # where two have it).
    low = min(r.data.metrics["val/loss"] for r in finished)
    best = min((r for r in finished if r.data.metrics["val/loss"] == low), key=lambda r: r.info.run_name)
    assert parent.data.tags["aigc.sweep.best_run_id"] == best.info.run_id
    assert parent.data.tags["aigc.sweep.best_trial"] == best.data.tags["aigc.run.name"]
    assert parent.data.metrics["best/val/loss"] == pytest.approx(best.data.metrics["val/loss"])
    assert f"best: {best.data.tags['aigc.run.name']} ({best.info.run_id})" in text
    # The end table names every trial with its params, value and status.
    for n, r in by_name.items():
        row = next(line for line in text.splitlines() if line.startswith(n + " "))
        assert ("STOPPED" if r.data.tags.get("aigc.sweep.stopped") else r.info.status) in row
    # No metric has two values at one step, in any trial, the continued ones included. (startup/*
    # are per launch, logged at step 0 by each: aigc.training.launcher._log_startup.)
    for n, r in by_name.items():
        for key in r.data.metrics:
            if key.startswith("startup/"):
                continue
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert len(steps) == len(set(steps)), (n, key, sorted(steps))
    assert sorted(m.step for m in client.get_metric_history(best.info.run_id, "val/loss")) == [5, 10, 15, 20]
    # --register-best: the best trial's run is a candidate version, not promoted.
    version = client.get_model_version_by_alias("aigc-diffusion", "candidate")
    assert version.run_id == best.info.run_id
    assert parent.data.tags["aigc.sweep.registered"] == f"aigc-diffusion/{version.version}"
    with pytest.raises(Exception, match="production"):
        client.get_model_version_by_alias("aigc-diffusion", "production")
