"""Recent training runs as plain dicts and as a table (``aigc runs``)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from mlflow.entities import ViewType

from aigc.contract import TAG_CHECKPOINT_STEP, eval_figures
from aigc.tracking.backend import client_for, ensure_tracking_store, resolve_tracking_uri
from aigc.tracking.lineage import TAG_FAMILY

TABLE_METRICS = ("train/loss", "val/loss", "eval/fd", "eval/cond_accuracy")


def model_figures(client: Any, run: Any, keys: tuple[str, ...] | None = None) -> dict[str, float]:
    """The ``eval/*`` figures of a run's model: the values at the step of the checkpoint that is its
    model (tag ``aigc.checkpoint.step``; the last value logged at that step), or, for a run without
    the tag, the latest of each. A run that evaluated during training has figures at many steps, and
    its model may be an earlier checkpoint than its last (``trainer.checkpoint_metric``). ``keys``
    limits the figures read (each is one metric-history request)."""
    latest = {k: v for k, v in eval_figures(run.data.metrics).items() if keys is None or k in keys}
    step = run.data.tags.get(TAG_CHECKPOINT_STEP)
    if step is None:
        return latest
    figures = {}
    for key in latest:
        at_step = [m for m in client.get_metric_history(run.info.run_id, key) if m.step == int(step)]
        if at_step:
            figures[key] = max(at_step, key=lambda m: m.timestamp).value
    return figures


def list_runs(
    uri: str | None = None, experiment: str | None = None, max_results: int = 20
) -> list[dict[str, Any]]:
    """The newest ``max_results`` runs of ``experiment`` (all active experiments when None).

    Each run is ``{"run_id", "run_name", "experiment", "status", "family", "start_time" (datetime,
    local time), "duration_s" (to now for a RUNNING run), "metrics" (latest value per key, the
    ``eval/*`` figures of its model: :func:`model_figures`), "tags"}``.
    An unknown experiment raises ``ValueError`` listing the ones there are.
    """
    uri = resolve_tracking_uri(uri)
    ensure_tracking_store(uri)
    client = client_for(uri)
    experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    names = {e.experiment_id: e.name for e in experiments}
    if experiment is not None:
        ids = [i for i, n in names.items() if n == experiment]
        if not ids:
            known = ", ".join(sorted(names.values())) or "none"
            raise ValueError(f"no MLflow experiment {experiment!r} in {uri} (experiments: {known})")
    else:
        ids = list(names)
    if not ids:
        return []
    runs = client.search_runs(ids, max_results=max_results, order_by=["attributes.start_time DESC"])
    now_ms = time.time() * 1000
    out = []
    for run in runs:
        info = run.info
        end_ms = info.end_time or (now_ms if info.status == "RUNNING" else None)
        out.append(
            {
                "run_id": info.run_id,
                "run_name": info.run_name,
                "experiment": names.get(info.experiment_id, info.experiment_id),
                "status": info.status,
                "family": run.data.tags.get(TAG_FAMILY),
                "start_time": datetime.fromtimestamp(info.start_time / 1000) if info.start_time else None,
                "duration_s": (end_ms - info.start_time) / 1000 if end_ms and info.start_time else None,
                # the eval/* figures are those of the run's model (model_figures)
                "metrics": dict(run.data.metrics) | model_figures(client, run, TABLE_METRICS),
                "tags": dict(run.data.tags),
            }
        )
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_runs_table(runs: list[dict[str, Any]]) -> str:
    """``list_runs`` output as an aligned text table, one run per line."""
    header = ["run id", "name", "status", "family", "start", "duration", *TABLE_METRICS]
    rows = [header]
    for run in runs:
        start = run["start_time"].strftime("%Y-%m-%d %H:%M") if run["start_time"] else "-"
        metrics = [f"{run['metrics'][m]:.4g}" if m in run["metrics"] else "-" for m in TABLE_METRICS]
        rows.append(
            [
                run["run_id"],
                run["run_name"] or "-",
                run["status"],
                run["family"] or "-",
                start,
                _duration(run["duration_s"]),
                *metrics,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)
