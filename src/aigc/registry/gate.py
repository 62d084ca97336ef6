"""The promotion gate: ``production`` moves to a candidate only when it is measurably better.

The rule (docs/architecture.md), on figures measured the same way (same evaluator hash, data version, sample
count and seed):

- ``eval/fd`` lower than production's by more than ``fd_margin``, and
- ``eval/cond_accuracy`` (where the data has labels) not worse than production's by more than
  ``accuracy_tolerance``.

The first version of a model always passes. A version registered from a run without a final
evaluation, or whose guards flagged collapse or copying, never passes (``--force`` still moves the
alias, recorded as forced). When the two versions' figures were not measured alike, both are
re-evaluated with the candidate's reference evaluator (same samples and seed) before comparing, and
the new figures are recorded on both versions. Every decision is recorded as ``aigc.gate.*`` tags
on the candidate; the former production version gets alias ``previous``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from aigc.config import StrictModel

# The provenance that makes two figures comparable and the tags holding it (aigc.eval.<key>) are
# defined once, where the final evaluation records them.
from aigc.contract import (
    DEFAULT_EVAL_SAMPLES,
    EVAL_TAG_PREFIX,
    TAG_GATE_COMPARED_WITH,
    TAG_GATE_DECIDED_AT,
    TAG_GATE_DECISION,
    TAG_GATE_REASON,
    eval_entries,
    eval_figures,
)
from aigc.contract import PROVENANCE as PROVENANCE_TAGS
from aigc.registry.versions import (
    ALIAS_CANDIDATE,
    ALIAS_PREVIOUS,
    ALIAS_PRODUCTION,
    TAG_ELIGIBLE,
    TAG_INELIGIBLE_REASON,
    TAG_RUN_ID,
    ModelRef,
    RegistryError,
    client_for,
    load_version,
    resolve_version,
)

FD, ACCURACY = "eval/fd", "eval/cond_accuracy"


class GateConfig(StrictModel):
    """How a candidate must beat production (``aigc promote`` flags override each key)."""

    fd_margin: float = Field(0.05, ge=0.0, description="eval/fd must be lower by more than this")
    accuracy_tolerance: float = Field(0.01, ge=0.0, description="eval/cond_accuracy may drop at most this")
    num_samples: int = Field(DEFAULT_EVAL_SAMPLES, ge=2, description="samples when the gate must re-evaluate")
    seed: int = Field(0, description="sampling seed when the gate must re-evaluate")


@dataclass
class Figures:
    """One version's comparable figures and how they were measured."""

    version: str
    metrics: dict[str, float]
    provenance: dict[str, str]
    source: str = "registration"  # or "gate re-evaluation"

    def line(self) -> str:
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in sorted(self.metrics.items()))
        how = ", ".join(f"{k} {str(v)[:12]}" for k, v in self.provenance.items())
        return f"v{self.version}: {shown or 'no figures'} ({how or 'no provenance'}; {self.source})"


@dataclass
class Decision:
    """What ``promote`` decided; ``promoted`` moved the alias (passed or forced)."""

    name: str
    candidate: Figures
    production: Figures | None
    passed: bool
    forced: bool
    reason: str
    reevaluated: bool = False
    checks: list[str] = field(default_factory=list)

    @property
    def promoted(self) -> bool:
        return self.passed or self.forced

    def report(self) -> str:
        verdict = "PROMOTED" if self.passed else ("FORCED" if self.forced else "REFUSED")
        lines = [f"{verdict}: {self.name} v{self.candidate.version} -> {ALIAS_PRODUCTION}: {self.reason}"]
        lines.append(f"  candidate   {self.candidate.line()}")
        if self.production is not None:
            lines.append(f"  production  {self.production.line()}")
        lines += [f"  {c}" for c in self.checks]
        return "\n".join(lines)


def figures_of(version: Any) -> Figures:
    """The ``eval/*`` figures and their provenance recorded on a version's tags."""
    tags = version.tags
    metrics = {k: float(v) for k, v in eval_entries(tags).items()}
    keys = {k: f"{EVAL_TAG_PREFIX}{k}" for k in PROVENANCE_TAGS}
    provenance = {k: tags[tag] for k, tag in keys.items() if tag in tags}
    return Figures(
        str(version.version), metrics, provenance, tags.get(f"{EVAL_TAG_PREFIX}source", "registration")
    )


def measured_alike(a: Figures, b: Figures) -> bool:
    return len(a.provenance) == len(PROVENANCE_TAGS) and a.provenance == b.provenance


def compare(candidate: Figures, production: Figures, gate: GateConfig) -> tuple[bool, list[str]]:
    """The rule of the module docstring; returns (passed, one line per check)."""
    checks = []
    if FD not in candidate.metrics or FD not in production.metrics:
        return False, ["eval/fd missing: nothing to compare"]
    c, p = candidate.metrics[FD], production.metrics[FD]
    fd_ok = c < p - gate.fd_margin
    mark = "ok  " if fd_ok else "FAIL"
    checks.append(f"{mark} eval/fd {c:.4f} < {p:.4f} - margin {gate.fd_margin} = {p - gate.fd_margin:.4f}")
    ok = fd_ok
    if ACCURACY in candidate.metrics and ACCURACY in production.metrics:
        ca, pa = candidate.metrics[ACCURACY], production.metrics[ACCURACY]
        acc_ok = ca >= pa - gate.accuracy_tolerance
        checks.append(
            f"{'ok  ' if acc_ok else 'FAIL'} eval/cond_accuracy {ca:.4f} >= {pa:.4f} - tolerance "
            f"{gate.accuracy_tolerance} = {pa - gate.accuracy_tolerance:.4f}"
        )
        ok = ok and acc_ok
    return ok, checks


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _reevaluate(client: Any, name: str, versions: list[Any], gate: GateConfig, progress) -> list[Figures]:
    """Re-measure ``versions`` on the candidate's (the first's) dataset and evaluator, the same way."""
    from aigc.evaluation.final import final_evaluation
    from aigc.tracking import logged_dataset

    dataset = logged_dataset(client.get_run(versions[0].tags[TAG_RUN_ID]))
    if dataset is None:
        raise RegistryError(f"{name} v{versions[0].version}'s run records no dataset: cannot re-evaluate")
    location = dataset[1]
    modules = [load_version(client, v) for v in versions]
    shapes = [(m.channels, m.image_size, m.image_size) for m in modules]
    if len(set(shapes)) > 1:  # e.g. a digits model in production, an emoji model as the candidate
        made = ", ".join(
            f"v{v.version} makes {'x'.join(map(str, s))}" for v, s in zip(versions, shapes, strict=True)
        )
        raise RegistryError(
            f"{name}: {made} images, so no evaluator measures both alike; register models of other "
            "data under their own name (tracking.registered_model in the run's config)"
        )
    out = []
    for v, module in zip(versions, modules, strict=True):
        if progress:
            how = f"{gate.num_samples} samples, seed {gate.seed}"
            progress(f"re-evaluating {name} v{v.version} on {location} ({how})")
        report = final_evaluation(
            module, location, num_samples=gate.num_samples, seed=gate.seed, progress=progress
        )
        figures = Figures(
            str(v.version),
            eval_figures(report),
            {k: str(report[k]) for k in PROVENANCE_TAGS},
            "gate re-evaluation",
        )
        for k, value in figures.metrics.items():
            client.set_model_version_tag(name, v.version, k, repr(value))
        for k, value in figures.provenance.items():
            client.set_model_version_tag(name, v.version, f"{EVAL_TAG_PREFIX}{k}", value)
        client.set_model_version_tag(name, v.version, f"{EVAL_TAG_PREFIX}source", "gate re-evaluation")
        out.append(figures)
    return out


def promote(
    name: str,
    version: str | None = None,
    *,
    force: bool = False,
    gate: GateConfig | None = None,
    tracking_uri: str | None = None,
    progress=None,
) -> Decision:
    """Move ``production`` to ``version`` (default: the ``candidate`` alias) if it passes the gate."""
    gate = gate or GateConfig()
    client = client_for(tracking_uri)
    ref = ModelRef(name, None if version else ALIAS_CANDIDATE, version)
    cand = resolve_version(client, ref)
    prod = _alias_version(client, name, ALIAS_PRODUCTION)
    if prod is not None and str(prod.version) == str(cand.version):
        raise RegistryError(f"{name} v{cand.version} is already {ALIAS_PRODUCTION}")
    cand_fig = figures_of(cand)
    prod_fig = figures_of(prod) if prod is not None else None
    reevaluated = False
    if cand.tags.get(TAG_ELIGIBLE) == "false":
        passed, checks = False, []
        reason = (
            f"v{cand.version} can never pass the gate: {cand.tags.get(TAG_INELIGIBLE_REASON, 'ineligible')}"
        )
    elif prod is None:
        passed, checks, reason = True, [], "the first production version of the model"
    else:
        if not measured_alike(cand_fig, prod_fig):
            cand_fig, prod_fig = _reevaluate(client, name, [cand, prod], gate, progress)
            reevaluated = True
        passed, checks = compare(cand_fig, prod_fig, gate)
        reason = (
            f"beats v{prod.version}" if passed else f"does not beat v{prod.version} (figures below)"
        ) + (" after re-evaluating both the same way" if reevaluated else "")
    decision = Decision(name, cand_fig, prod_fig, passed, force and not passed, reason, reevaluated, checks)
    verdict = "passed" if passed else ("forced" if decision.forced else "refused")
    for key, value in {
        TAG_GATE_DECISION: verdict,
        TAG_GATE_REASON: reason,
        TAG_GATE_COMPARED_WITH: "" if prod is None else str(prod.version),
        TAG_GATE_DECIDED_AT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }.items():
        client.set_model_version_tag(name, cand.version, key, value)
    if decision.promoted:
        if prod is not None:
            client.set_registered_model_alias(name, ALIAS_PREVIOUS, prod.version)
        client.set_registered_model_alias(name, ALIAS_PRODUCTION, cand.version)
        waiting = _alias_version(client, name, ALIAS_CANDIDATE)
        if waiting is not None and str(waiting.version) == str(cand.version):
            client.delete_registered_model_alias(name, ALIAS_CANDIDATE)  # decided: no longer waiting
    return decision


def rollback(name: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """Swap ``production`` and ``previous``; returns (new production, new previous) versions."""
    client = client_for(tracking_uri)
    prod = _alias_version(client, name, ALIAS_PRODUCTION)
    prev = _alias_version(client, name, ALIAS_PREVIOUS)
    if prod is None or prev is None:
        missing = ALIAS_PRODUCTION if prod is None else ALIAS_PREVIOUS
        raise RegistryError(f"{name} has no {missing!r} alias: nothing to roll back to")
    client.set_registered_model_alias(name, ALIAS_PRODUCTION, prev.version)
    client.set_registered_model_alias(name, ALIAS_PREVIOUS, prod.version)
    client.set_model_version_tag(name, prev.version, TAG_GATE_DECISION, "rolled back to")
    return str(prev.version), str(prod.version)
