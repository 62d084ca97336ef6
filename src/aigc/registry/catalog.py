"""What the registry holds: ``aigc models`` (models, aliases, figures) and ``aigc lineage`` (a
version back to its run, data and code), read from MLflow alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aigc.contract import (
    TAG_CHECKPOINT_STEP,
    TAG_DATA_NAME,
    TAG_DATA_VERSION,
    TAG_GIT_SHA,
    TAG_INIT_FROM,
    TAG_INIT_MODEL,
    TAG_INIT_RUN_ID,
    TAG_INIT_VERSION,
    TAG_RUN_NAME,
    TAG_STORAGE,
    eval_entries,
)
from aigc.registry.versions import MODEL_PREFIX, TAG_RUN_ID, ModelRef, client_for, parse_ref, resolve_version


@dataclass
class ModelSummary:
    name: str
    latest: str
    aliases: dict[str, str]  # alias -> version
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # alias -> eval/* figures


def list_models(tracking_uri: str | None = None) -> list[ModelSummary]:
    """Every ``aigc-*`` registered model with its aliases and the figures of each aliased version."""
    client = client_for(tracking_uri)
    out = []
    for model in client.search_registered_models(filter_string=f"name LIKE '{MODEL_PREFIX}%'"):
        versions = client.search_model_versions(f"name='{model.name}'")
        latest = max((int(v.version) for v in versions), default=0)
        aliases = {a: str(v) for a, v in sorted(model.aliases.items())}
        figures = {}
        for alias, version in aliases.items():
            tags = client.get_model_version(model.name, version).tags
            figures[alias] = {k: float(v) for k, v in eval_entries(tags).items()}
        out.append(ModelSummary(model.name, str(latest), aliases, figures))
    return sorted(out, key=lambda m: m.name)


def format_models(models: list[ModelSummary]) -> str:
    if not models:
        return "no registered aigc models (register a run: aigc register RUN)"
    lines = []
    for m in models:
        aliases = ", ".join(f"{a}=v{v}" for a, v in m.aliases.items()) or "no aliases"
        lines.append(f"{m.name}  (latest v{m.latest}; {aliases})")
        for alias, figs in m.figures.items():
            shown = ", ".join(
                f"{k.removeprefix('eval/')} {v:.4f}"
                for k, v in sorted(figs.items())
                if k in ("eval/fd", "eval/clip_score", "eval/cond_accuracy")
            )
            lines.append(f"  {alias:<11} v{m.aliases[alias]}: {shown or 'no figures'}")
    return "\n".join(lines)


def lineage(ref: str | ModelRef, tracking_uri: str | None = None) -> dict[str, Any]:
    """version -> run -> data version (DVC md5) -> shard location -> git sha, from MLflow alone."""
    from aigc.tracking import logged_dataset

    client = client_for(tracking_uri)
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    version = resolve_version(client, ref)
    run_id = version.tags.get(TAG_RUN_ID) or version.run_id
    run = client.get_run(run_id)
    tags = run.data.tags
    dataset = logged_dataset(run)
    return {
        "model": version.name,
        "version": str(version.version),
        "aliases": list(getattr(version, "aliases", []) or []),
        "run_id": run_id,
        "run_name": tags.get(TAG_RUN_NAME, run.info.run_name),
        "run_status": run.info.status,
        "experiment_id": run.info.experiment_id,
        "data_name": tags.get(TAG_DATA_NAME) or (dataset[0] if dataset else None),
        "data_version": tags.get(TAG_DATA_VERSION) or (dataset[2] if dataset else None),
        "data_location": dataset[1] if dataset else None,
        "git_sha": tags.get(TAG_GIT_SHA),
        "checkpoints": tags.get(TAG_STORAGE),
        # the step of the checkpoint this version is (the run's best, when it evaluated during training)
        "checkpoint_step": version.tags.get(TAG_CHECKPOINT_STEP) or tags.get(TAG_CHECKPOINT_STEP),
        "model_source": version.source,
        # a fine-tuned model's ancestry (aigc train --init-from), back to a model trained from scratch
        "started_from": _ancestry(client, tags),
    }


def _ancestry(client: Any, tags: dict[str, str], limit: int = 50) -> list[dict[str, Any]]:
    """What a run's weights started from, one entry per generation, back to a run trained from
    scratch (or a source outside the store, such as an export folder): the reference given, the
    registered model and version it named, and that source's run, data and git sha."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    while tags.get(TAG_INIT_FROM) and len(chain) < limit:
        entry: dict[str, Any] = {
            "ref": tags[TAG_INIT_FROM],
            "model": tags.get(TAG_INIT_MODEL),
            "version": tags.get(TAG_INIT_VERSION),
            "run_id": tags.get(TAG_INIT_RUN_ID),
        }
        chain.append(entry)
        run_id = entry["run_id"]
        if not run_id or run_id in seen:
            break
        seen.add(run_id)
        try:
            run = client.get_run(run_id)
        except Exception:  # noqa: BLE001 - a source run deleted since: the chain ends there, said so
            entry["run_name"] = "(run not found)"
            break
        tags = run.data.tags
        entry |= {
            "run_name": tags.get(TAG_RUN_NAME, run.info.run_name),
            "data_name": tags.get(TAG_DATA_NAME),
            "data_version": tags.get(TAG_DATA_VERSION),
            "git_sha": tags.get(TAG_GIT_SHA),
        }
    return chain


def format_lineage(chain: dict[str, Any]) -> str:
    c = chain
    aliases = f" ({', '.join(c['aliases'])})" if c["aliases"] else ""
    return "\n".join(
        [
            f"{c['model']} v{c['version']}{aliases}   model {c['model_source']}",
            f"  <- run      {c['run_name']} ({c['run_id']}, {c['run_status']}, "
            f"experiment {c['experiment_id']})",
            f"  <- data     {c['data_name']} version {c['data_version']}",
            f"  <- shards   {c['data_location']}",
            f"  <- code     git {c['git_sha'] or 'unknown'}",
            f"     checkpoints {c['checkpoints']}"
            + (f" (this model: step {c['checkpoint_step']})" if c.get("checkpoint_step") else ""),
            *_format_ancestry(c.get("started_from") or []),
        ]
    )


def _format_ancestry(chain: list[dict[str, Any]]) -> list[str]:
    """``<- from`` lines, one per generation, ending with the model trained from scratch."""
    lines = []
    for a in chain:
        what = f"{a['model']} v{a['version']}" if a.get("model") else a["ref"]
        run = f", run {a.get('run_name') or '?'} ({a['run_id']})" if a.get("run_id") else ""
        data = f", data {a['data_name']} version {a['data_version']}" if a.get("data_name") else ""
        lines.append(f"  <- from     {what}{run}{data}")
    if chain:
        last = chain[-1]
        lines.append(
            "     (trained from scratch)"
            if last.get("run_id") and last.get("run_name") != "(run not found)"
            else "     (its own origin is not in this store)"
        )
    return lines
