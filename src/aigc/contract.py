"""The contracts every layer shares: names on disk, names in MLflow, defaults that are provenance.

This module is the bottom layer (``docs/architecture.md``): it imports nothing of aigc and nothing
outside the standard library, so every other module can name these facts without importing the
code that writes or reads them. A fact here is defined once; the rest of the code imports it.

- **The run folder** ``<storage>/<run name>/`` that ``aigc train`` writes: the job record, one
  folder per reported checkpoint holding :data:`CHECKPOINT_NAME`, and the final sample grid.
- **Run tags** (``aigc.*``) that ``aigc train`` writes and the registry, ``aigc runs`` and
  ``aigc lineage`` read; the evaluation's provenance tags and guards; the ``eval/`` metric prefix.
- **Version tags** the registry writes on a model version, and the aliases it moves.
- **Defaults that are part of a figure's provenance**: the number of samples an evaluation draws
  (two figures are comparable only when their sample counts match, so the default is one number).
- **The model-reference grammar** (``aigc-diffusion@production``, ``aigc-vae/3``,
  ``models:/aigc-gan@candidate``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# ------------------------------------------------------------------------------------ run folder

#: The job record ``aigc train`` writes into the run folder (``aigc.training.job``); resume reads it.
JOB_FILE = "aigc-job.json"
#: Every reported checkpoint is a folder ``checkpoint-step<8-digit step>`` under the run folder,
#: holding one Lightning file :data:`CHECKPOINT_NAME` and :data:`STEP_FILE` (``{"global_step": N}``);
#: the names sort in step order. A folder is complete when both are there and neither is empty.
CHECKPOINT_DIR_PREFIX = "checkpoint-step"
CHECKPOINT_NAME = "checkpoint.ckpt"
STEP_FILE = "aigc-step.json"
CHECKPOINT_FILES = (STEP_FILE, CHECKPOINT_NAME)


def checkpoint_dir_name(step: int) -> str:
    """The folder name of the checkpoint reported at ``step`` (``checkpoint-step00000040``)."""
    return f"{CHECKPOINT_DIR_PREFIX}{int(step):08d}"


#: The files of an export folder (``aigc.models.export``), all required: here so that code which must
#: not import torch (``aigc train``'s driver, ``aigc.models.init``) names them too.
EXPORT_FILES = ("weights.safetensors", "config.json", "tokenizer.json")
#: The folder of the run folder holding the export a fine-tuned job started from (``aigc train
#: --init-from``): copied there once, so every worker reads it from the run's storage and a resume
#: before the first checkpoint starts from the same weights.
INIT_DIR = "init-from"
#: beside the export in ``INIT_DIR``: what it is (``{"ref", "model", "version", "run_id"}``), so a LoRA
#: model trained on it names its base in its own exports
INIT_SOURCE_FILE = "aigc-source.json"

#: The sample grid rank 0 writes into the run folder at the end of training (and logs to MLflow).
FINAL_GRID = "samples-final.png"
#: The report of a checkpoint's evaluation during training (``trainer.eval_every_steps``), written
#: into its checkpoint folder: every ``eval/*`` figure, the provenance and the guards, as JSON.
EVAL_FILE = "aigc-eval.json"

# ------------------------------------------------------------------------------------ run tags

TAG_FAMILY = "aigc.family"
TAG_GIT_SHA = "aigc.git_sha"
TAG_DATA_NAME = "aigc.data.name"
TAG_DATA_VERSION = "aigc.data.version"
TAG_RAY_WORKERS = "aigc.ray.workers"
#: the run name ``aigc train`` gave the job (``--name``, ``--resume NAME``)
TAG_RUN_NAME = "aigc.run.name"
#: the run folder (local path or URL) holding the job record and the checkpoints
TAG_STORAGE = "aigc.storage"
#: the registry name ``aigc register`` gives the run's model (``tracking.registered_model``)
TAG_REGISTERED_MODEL = "aigc.registered_model"
TAG_ERROR = "aigc.error"
#: the step of the checkpoint that is the run's model: what its final evaluation measured, what
#: ``aigc register`` exports. The best by ``trainer.checkpoint_metric`` when the run evaluated
#: during training, else the last.
TAG_CHECKPOINT_STEP = "aigc.checkpoint.step"
# A fine-tuned run (``aigc train --init-from REF``): the reference as given, and what it resolved to:
# the registered model and version, and the run that trained those weights (absent for an export
# folder from elsewhere). ``aigc lineage`` follows TAG_INIT_RUN_ID back to a model trained from scratch.
TAG_INIT_FROM = "aigc.init.from"
TAG_INIT_MODEL = "aigc.init.model"
TAG_INIT_VERSION = "aigc.init.version"
TAG_INIT_RUN_ID = "aigc.init.run_id"
INIT_TAGS = (TAG_INIT_FROM, TAG_INIT_MODEL, TAG_INIT_VERSION, TAG_INIT_RUN_ID)
#: each init tag's field in the records that name a source outside MLflow (``INIT_SOURCE_FILE``, a
#: LoRA export's ``base``)
INIT_TAG_FIELDS = {
    TAG_INIT_FROM: "ref",
    TAG_INIT_MODEL: "model",
    TAG_INIT_VERSION: "version",
    TAG_INIT_RUN_ID: "run_id",
}
# What of the data the run did not see as its version describes it. Shards that differed from the
# manifest when the job started (allowed by --allow-modified-data): "true", and which ones, how.
TAG_DATA_MODIFIED = "aigc.data.modified"
TAG_DATA_MODIFIED_SHARDS = "aigc.data.modified_shards"
# Samples the loader skipped as unreadable: per epoch, summed over ranks (metrics), and the shards
# that lost the most over the run (tag, "name (count), ...").
METRIC_BAD_SAMPLES = "data/bad_samples"
METRIC_BAD_FRACTION = "data/bad_fraction"
TAG_DATA_BAD_SHARDS = "aigc.data.bad_shards"

# ------------------------------------------------------------------------------------ evaluation

#: The prefix of every evaluation figure logged as a metric (``eval/fd``, ``eval/clip_score``, ...).
EVAL_PREFIX = "eval/"
#: Run tags holding each figure's provenance: aigc.eval.evaluator_hash, .data_version, .num_samples,
#: .seed (figures of two runs are comparable only when all four match), and the guards
#: aigc.eval.collapse and .copying ("True"/"False"; the registry's gate refuses a flagged model).
EVAL_TAG_PREFIX = "aigc.eval."
PROVENANCE = ("evaluator_hash", "data_version", "num_samples", "seed")
GUARDS = ("collapse", "copying")
#: Samples an evaluation draws unless told otherwise: ``aigc train``, ``aigc evaluate``,
#: ``aigc quickstart`` and the gate's re-evaluation. Part of a figure's provenance.
DEFAULT_EVAL_SAMPLES = 500


#: The figures a checkpoint may be chosen by (``trainer.checkpoint_metric``), each with the
#: direction that is better: "min" or "max". An autoencoder is measured by reconstruction
#: (``eval/psnr``, ``eval/mse``, ``eval/fd`` of its reconstructions); ``eval/cond_accuracy`` exists
#: on labelled data only.
CHECKPOINT_METRICS = {
    "eval/fd": "min",
    "eval/clip_score": "max",
    "eval/cond_accuracy": "max",
    "eval/psnr": "max",
    "eval/mse": "min",
}
#: The run's sample grid at each evaluation during training, one image per evaluated step.
EVAL_GRID_KEY = "eval_samples"


def is_eval_key(key: str) -> bool:
    """Whether a metric name is an evaluation figure (``eval/...``)."""
    return key.startswith(EVAL_PREFIX)


def eval_entries(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """The ``eval/*`` entries of a mapping, values as they are (a version's tags hold them as text)."""
    return {k: v for k, v in mapping.items() if is_eval_key(k)}


def eval_figures(report: Mapping[str, Any]) -> dict[str, float]:
    """The numeric ``eval/*`` figures of a report or a run's metrics (what is logged as metrics,
    compared by the gate and written for DVC); provenance strings and boolean guards left out."""
    return {
        k: float(v)
        for k, v in report.items()
        if is_eval_key(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def eval_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The ``aigc.eval.*`` tags (provenance and guards) among a run's tags."""
    return {k: v for k, v in tags.items() if k.startswith(EVAL_TAG_PREFIX)}


# ------------------------------------------------------------------------------------ registry

#: A model of family F is registered as ``aigc-F``.
MODEL_PREFIX = "aigc-"
ALIAS_CANDIDATE = "candidate"
ALIAS_PRODUCTION = "production"
ALIAS_PREVIOUS = "previous"
# Version tags: where a version came from, and what the gate decided.
TAG_RUN_ID = "aigc.run_id"
TAG_ELIGIBLE = "aigc.gate.eligible"
TAG_INELIGIBLE_REASON = "aigc.gate.ineligible_reason"
TAG_GATE_DECISION = "aigc.gate.decision"
TAG_GATE_REASON = "aigc.gate.reason"
TAG_GATE_COMPARED_WITH = "aigc.gate.compared_with"
TAG_GATE_DECIDED_AT = "aigc.gate.decided_at"

#: A registered version: ``NAME@ALIAS``, ``NAME/VERSION``, either behind ``models:/``, or a bare
#: ``NAME`` (which means a default alias where the caller allows it).
MODEL_REF = re.compile(
    r"^(?:models:/)?(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))?$"
)


def is_version_ref(ref: str) -> bool:
    """Whether ``ref`` names a registered version explicitly (an alias or a number, not a bare name):
    what tells ``aigc-autoencoder@candidate`` from a run name or a folder."""
    m = MODEL_REF.match(ref.strip())
    return bool(m and (m["alias"] or m["version"]))
