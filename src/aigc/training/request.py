"""What a caller asks of one training job, declared once.

:class:`TrainRequest` is the one declaration of ``aigc train``'s options: the command line takes
each flag's default and help from its field (``aigc.cli.train``), :func:`aigc.training.train`
takes a request (or its fields as keywords), and a resumed job is the request on top of the job
record it continues (:meth:`TrainRequest.continuing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aigc.config import ConfigError, RunConfig, apply_overrides, load_config, parse_workers, validate
from aigc.contract import (
    ALIAS_CANDIDATE,
    DEFAULT_EVAL_SAMPLES,
    EVAL_PREFIX,
    MODEL_PREFIX,
    TAG_DATA_MODIFIED,
)
from aigc.training.job import TrainError, TrainJob


def _option(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class TrainRequest:
    """One training job as asked for: the config, the options applied on top, what to do after.
    Each field's ``metadata["help"]`` is its flag's help (``aigc.cli.common.field_option``)."""

    config: str | Path | RunConfig | None = _option(None, "run config, e.g. models/diffusion.yaml")
    overrides: list[str] = field(
        default_factory=list, metadata={"help": "dotted override KEY=VALUE (repeatable)"}
    )
    workers: int | str | None = _option(
        None, "Ray Train workers (scaling.num_workers): N, or MIN-MAX for elastic training"
    )
    gpus_per_worker: float | None = _option(None, "GPUs per worker")
    ray_address: str | None = _option(None, "join this Ray cluster")
    name: str | None = _option(None, "run name (must be new)")
    resume: str | None = _option(None, "continue the run with this name")
    metrics_out: str | Path | None = _option(
        None, f"write the run id, step and {EVAL_PREFIX}* figures as JSON"
    )
    evaluate: bool = _option(True, "evaluate the final checkpoint")
    eval_samples: int = _option(DEFAULT_EVAL_SAMPLES, "samples for the final evaluation")
    # Honoured by aigc.workflows.train.train_and_register (what `aigc train` runs): the training
    # package itself never registers.
    register: bool = _option(True, f"register the final model as {MODEL_PREFIX}<family>@{ALIAS_CANDIDATE}")
    allow_modified_data: bool = _option(
        False, f"train on shards that differ from the manifest; the run is tagged {TAG_DATA_MODIFIED}"
    )
    verify_data: bool = _option(False, "re-hash every shard against the manifest before training")
    # A sweep's trial (aigc.workflows.sweep): the new run is tagged mlflow.parentRunId, so the MLflow
    # UI nests it under the sweep's run and compares it with its siblings.
    parent_run_id: str | None = _option(
        None, "MLflow run id of the parent run (a sweep's) to nest the run under"
    )

    init_from: str | None = _option(
        None,
        "start from this model's weights and tokenizer (fine-tuning): a registered version "
        "(aigc-vae@production, aigc-vae/3), a run's id or name, or an export folder",
    )

    def __post_init__(self) -> None:
        if self.name and self.resume:
            raise TrainError("--name and --resume exclude each other: --resume NAME continues run NAME")
        if self.init_from and self.resume:
            raise TrainError(
                "--init-from and --resume exclude each other: a resumed run continues from its own "
                "checkpoint (and from the model it was started from, which its record names)"
            )

    @classmethod
    def of(
        cls,
        request: TrainRequest | str | Path | RunConfig | None,
        overrides: list[str] | None = None,
        **options: Any,
    ) -> TrainRequest:
        """``request`` itself, or the request for config ``request`` with ``overrides`` and the other
        fields as keywords (``train(cfg, name="x", evaluate=False)``)."""
        if isinstance(request, TrainRequest):
            if overrides or options:
                raise TypeError("give a TrainRequest or its fields, not both")
            return request
        return cls(config=request, overrides=list(overrides or []), **options)

    def run_config(self) -> RunConfig:
        """The run config with the overrides and the scaling options applied; errors name the key."""
        if isinstance(self.config, RunConfig):
            cfg = validate(RunConfig, apply_overrides(self.config.model_dump(mode="json"), self.overrides))
        else:
            cfg = load_config(self.config, self.overrides)
        if self.workers is not None:
            try:
                cfg.scaling.num_workers = parse_workers(self.workers)
            except ValueError as err:
                raise ConfigError(f"--workers: {err}") from None
        if self.gpus_per_worker is not None:
            cfg.scaling.gpus_per_worker = self.gpus_per_worker
            cfg.scaling.use_gpu = self.gpus_per_worker > 0
        if self.ray_address is not None:
            cfg.scaling.ray_address = self.ray_address
        return cfg

    def continuing(self, saved: TrainJob) -> TrainRequest:
        """This ``--resume`` request on top of the job record it continues: the job's own config (its
        checkpoints were written with it) under the options given now, and ``allow_modified_data``
        kept once the job had it (its first part already trained on that data)."""
        return replace(
            self, config=saved.run, allow_modified_data=self.allow_modified_data or saved.allow_modified_data
        )
