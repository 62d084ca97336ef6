"""What every family's LightningModule shares: one constructor from plain-JSON hyperparameters, the
text encoder (for the families that condition on text), the optimiser schedule and the pieces of
the ``generate`` contract.

A family module subclasses :class:`GenerativeModule`, sets ``family`` and implements
:meth:`~GenerativeModule.build_nets`, ``training_step``, ``validation_step`` and ``_generate``; it
has no ``__init__`` of its own. :meth:`GenerativeModule.__init__` validates the hyperparameters
once into a :class:`ModuleSpec` (the ``model`` dict into the family's config class,
``aigc.config.MODEL_CONFIGS[family]``), builds what every family shares and then calls
``build_nets(spec)``.

The hyperparameters are plain JSON types (dicts of the pydantic configs dumped with
``mode="json"``): Lightning 2.6 resumes checkpoints with ``weights_only=True``, which refuses
pickled config objects. Checkpoints are rebuilt with ``cls(**hyper_parameters)`` and exports with
``cls(model=..., tokenizer=..., image_size=..., channels=..., latent=...)``
(:mod:`aigc.models.export`), so the constructor's arguments are that format.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import nn

from aigc.config import MODEL_CONFIGS, StrictModel, TrainerConfig, validate
from aigc.data.latents import CARRIED_KINDS
from aigc.models.text import Tokenizer, build_text_encoder


def warmup_cosine(step: int, warmup: int, total: int, schedule: str) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then constant or cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] ``(N, C, H, W)`` -> uint8 in [0, 255] on the CPU."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def expand_prompts(prompts: list[str] | str, num_samples: int) -> list[str]:
    """``num_samples`` images per prompt, grouped by prompt: [p0, p0, ..., p1, p1, ...]."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("prompts must hold at least one prompt (use '' for unconditional samples)")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return [p for p in prompts for _ in range(num_samples)]


def drop_captions(captions: list[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Each caption replaced by ``""`` with probability ``p``: classifier-free guidance's condition
    dropout (Ho & Salimans 2022), so one net also learns the unconditional model.

    Draws ``len(captions)`` uniforms from ``generator`` (the global RNG when None), none when ``p <= 0``.
    """
    if p <= 0:
        return list(captions)
    drop = (torch.rand(len(captions), generator=generator) < p).tolist()
    return ["" if d else cap for d, cap in zip(drop, captions, strict=True)]


@torch.no_grad()
def ema_update(
    pairs: Iterable[tuple[nn.Module, nn.Module]], updates: torch.Tensor, max_decay: float
) -> float:
    """One EMA step of each ``(ema, live)`` module pair; returns the decay used.

    The decay is warmed up as ``min(max_decay, (1 + n) / (10 + n))`` with ``n = updates`` (the
    ``num_updates`` rule of TensorFlow's ``ExponentialMovingAverage``), so early EMA weights are not
    mostly the random initialisation. Trained parameters move as ``ema.lerp_(live, 1 - decay)``; buffers
    (e.g. norm statistics) are copied. ``updates`` (a 0-dim long tensor buffer) is incremented in place.
    """
    n = int(updates)
    decay = min(max_decay, (1 + n) / (10 + n))
    for ema, live in pairs:
        for pe, pv in zip(ema.parameters(), live.parameters(), strict=True):
            if not pv.requires_grad:
                # A frozen weight does not train: the EMA keeps its own. (For a LoRA model, the base's
                # EMA weights, which it generates with, stay bit-identical; only adapters average.)
                continue
            pe.lerp_(pv.detach().to(pe.dtype), 1.0 - decay)
        for be, bl in zip(ema.buffers(), live.buffers(), strict=True):
            be.copy_(bl)
    updates += 1
    return decay


def valid_rows(batch: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """A val batch's images ``(B', C, H, W)`` and captions without the loader's padding repeats
    (``batch["valid"] == False``), so every val image counts once in a metric."""
    images, captions = batch["image"], list(batch["caption"])
    if "valid" in batch:
        keep = batch["valid"].bool()
        images, captions = images[keep], [c for c, k in zip(captions, keep.tolist(), strict=True) if k]
    return images, captions


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on ``device``: seeded when ``seed`` is given, else from fresh OS entropy."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


#: state_dict prefix of the text encoder (and of nothing else), see GenerativeModule.text_conditioned
TEXT_ENCODER_PREFIX = "text_encoder."


@dataclass(frozen=True)
class ModuleSpec:
    """A family module's validated hyperparameters: what :meth:`GenerativeModule.build_nets` builds from.

    ``latent`` is the ``latent`` section of a latent dataset's manifest (:mod:`aigc.data.latents`),
    or None for a pixel model; ``image_size`` and ``channels`` are always the pixel images'.
    """

    model: StrictModel  #: the family's config: an instance of aigc.config.MODEL_CONFIGS[family]
    tokenizer: Tokenizer
    image_size: int
    channels: int
    trainer: TrainerConfig
    latent: dict[str, Any] | None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """What the family's net models for one image: ``(C, H, W)`` pixels, or the latent's shape."""
        if self.latent is not None:
            return tuple(self.latent["shape"])
        return (self.channels, self.image_size, self.image_size)


class GenerativeModule(pl.LightningModule):
    """Base of the family modules; the only constructor (see the module docstring)."""

    family: ClassVar[str]
    #: whether the family can learn on a latent dataset (aigc.data.latents) and decode with its
    #: autoencoder: diffusion over KL latents, autoregression over VQ codes
    latent_kinds: ClassVar[tuple[str, ...]] = ()
    #: whether the family reads captions: only then is ``text_encoder`` built (from ``model.text``)
    text_conditioned: ClassVar[bool] = True
    #: a family that brings its own pretrained tokenizer and text encoder (a diffusers pipeline's
    #: CLIP): nothing is built from ``model.text`` (it has none) and ``build_nets`` sets
    #: ``text_encoder``; the aigc ``tokenizer`` argument is kept for the constructor's format only
    own_text_encoder: ClassVar[bool] = False
    #: LoRA (``model.lora``, :mod:`aigc.models.lora`): the nets that take adapters and their default
    #: target layers (PEFT's ``target_modules``: layer names or name suffixes); empty: no LoRA
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: EMA copies by attribute, and the net each follows: rebuilt from the adapted nets under LoRA
    ema_nets: ClassVar[dict[str, str]] = {}
    #: family options accepted by generate() and their types (the registry's pyfunc signature and
    #: the server's request schema come from here); anything else is an error naming them.
    generate_options: ClassVar[dict[str, type]] = {}
    #: the model-config field holding an option's default, where its name differs from the option's
    option_config_fields: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        model: dict[str, Any],
        tokenizer: dict[str, Any],
        image_size: int,
        channels: int,
        trainer: dict[str, Any] | None = None,
        latent: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()  # plain JSON only: see the module docstring
        self.spec = self.validate_spec(model, tokenizer, image_size, channels, trainer, latent)
        # Checkpoints carry the resolved config (family included), whatever the caller passed.
        self.hparams["model"] = self.model_cfg.model_dump(mode="json")
        # The order matters to seeded runs: text encoder, carried autoencoder, then the family's
        # nets draw their initial weights from the global RNG in turn; reordering changes them all.
        self.text_encoder = (
            build_text_encoder(self.model_cfg.text, len(self.tokenizer))
            if self.text_conditioned and not self.own_text_encoder
            else None
        )
        if not self.text_conditioned:
            # Earlier releases built (and froze) a text encoder here for every family. Building one
            # and dropping it takes the same draws from the global RNG, so a seed still gives the
            # nets it gave then: the calibrated figures of the quality tests and model cards hold.
            # Nothing of it is kept: not in the module, its checkpoints or its exports.
            build_text_encoder(self.model_cfg.text, len(self.tokenizer))
            # Checkpoints and exports written when every family kept a text encoder still load.
            self.register_load_state_dict_pre_hook(_drop_text_encoder_keys)
        # A latent model: the net learns on latents of ``sample_shape`` and ``generate`` decodes them
        # with the frozen autoencoder carried here, so checkpoints and exports hold both and still
        # return pixels (the sd family decodes with its pipeline's own VAE instead).
        if self.carries_autoencoder:
            from aigc.models.nets.autoencoder import autoencoder_net

            ae = autoencoder_net(self.latent["autoencoder_model"], self.image_size, self.channels)
            self.autoencoder = ae.requires_grad_(False).eval()
        # Frozen weights of a base model that checkpoints and exports leave out (base_weight_keys).
        self._base_keys: frozenset[str] = frozenset()
        self.register_load_state_dict_post_hook(_tolerate_missing_base)
        self.build_nets(self.spec)
        lora = getattr(self.model_cfg, "lora", None)
        if lora is not None and self.lora_targets:
            from aigc.models.lora import apply_lora, is_adapter_key

            apply_lora(self, lora)
            # Everything but the adapters (and their EMA) is the base model's: --init-from loads it.
            self._base_keys = frozenset(n for n, _ in self.named_parameters() if not is_adapter_key(n))

    @classmethod
    def validate_spec(
        cls,
        model: dict[str, Any],
        tokenizer: dict[str, Any],
        image_size: int,
        channels: int,
        trainer: dict[str, Any] | None = None,
        latent: dict[str, Any] | None = None,
    ) -> ModuleSpec:
        """The constructor's plain-JSON arguments, validated: a bad key or value raises
        :class:`aigc.config.ConfigError` naming it, a latent kind the family cannot learn a ValueError."""
        model_cfg = validate(MODEL_CONFIGS[cls.family], dict(model, family=cls.family), prefix="model")
        latent = dict(latent) if latent else None
        if latent is not None and latent.get("kind") not in cls.latent_kinds:
            allowed = ", ".join(cls.latent_kinds) or "none"
            raise ValueError(
                f"family {cls.family!r} cannot learn on {latent.get('kind')!r} latents (allowed: {allowed}); "
                "train it on the image dataset, or use diffusion (kl), autoregressive (vq) or sd (sd)"
            )
        return ModuleSpec(
            model=model_cfg,
            tokenizer=Tokenizer.from_dict(tokenizer),
            image_size=int(image_size),
            channels=int(channels),
            trainer=validate(TrainerConfig, trainer or {}, prefix="trainer"),
            latent=latent,
        )

    def build_nets(self, spec: ModuleSpec) -> None:
        """Build the family's networks (and buffers) on ``self``; called once, at the end of
        ``__init__``, after the shared parts (``text_encoder``, a latent model's ``autoencoder``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_nets")

    # ------------------------------------------------------------------------- the spec's fields
    # Read-only views of ``self.spec``: one source for what the module was built from.
    @property
    def model_cfg(self) -> Any:
        """The family's validated model config (``aigc.config.MODEL_CONFIGS[family]``)."""
        return self.spec.model

    @property
    def trainer_cfg(self) -> TrainerConfig:
        return self.spec.trainer

    @property
    def tokenizer(self) -> Tokenizer:
        return self.spec.tokenizer

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def channels(self) -> int:
        return self.spec.channels

    @property
    def latent(self) -> dict[str, Any] | None:
        """The latent dataset's manifest section this model learns on; None for a pixel model."""
        return self.spec.latent

    # ----------------------------------------------------------------------------------- latents
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """What the family's net models for one image: ``(C, H, W)`` pixels, or the latent's shape."""
        return self.spec.sample_shape

    @property
    def carries_autoencoder(self) -> bool:
        """Whether this latent model holds the frozen ``autoencoder`` of its dataset (KL, VQ latents)."""
        return self.latent is not None and self.latent["kind"] in CARRIED_KINDS

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``sample_shape`` (KL: scaled as trained, VQ: codes) -> images (N, C, H, W) in [-1, 1]."""
        assert self.latent is not None
        if self.latent["kind"] == "vq":
            return self.autoencoder.decode_tokens(z.long()).clamp(-1, 1)
        return self.autoencoder.decode(z / float(self.latent["scale"])).clamp(-1, 1)

    def load_autoencoder(self, source: GenerativeModule) -> None:
        """Copy an autoencoder module's weights into this latent model's frozen ``autoencoder``."""
        if not self.carries_autoencoder:
            raise ValueError(f"this {self.family} model carries no autoencoder to load")
        self.autoencoder.load_state_dict(source.autoencoder.state_dict())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.carries_autoencoder:  # the carried autoencoder is frozen: always in eval mode
            self.autoencoder.eval()
        return self

    # ------------------------------------------------------------------------------------- text
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """captions -> tokens (B, T, D), mask (B, T), pooled (B, D) on this module's device."""
        if self.text_encoder is None:
            raise ValueError(f"the {self.family} family is not text-conditioned: it has no text encoder")
        return self.text_encoder.encode(captions, self.tokenizer, self.device)

    # ------------------------------------------------------------------------------- optimisers
    def lr_lambda(self, step: int) -> float:
        tc = self.trainer_cfg
        return warmup_cosine(step, tc.warmup_steps, tc.max_steps, tc.lr_schedule)

    # ------------------------------------------------------------------------------- base weights
    def base_weight_keys(self) -> set[str]:
        """state_dict keys of the frozen weights of a base model (empty unless a family or
        ``model.lora`` freezes one): Lightning checkpoints and exports leave them out, and a load
        may miss exactly these; whoever loads such a module loads its base first."""
        return set(self._base_keys)

    @property
    def needs_base(self) -> bool:
        """Whether this module's base weights come from another model (a LoRA model on aigc's own
        families: its ``--init-from`` source), so a checkpoint or export of it loads onto that base.
        (The sd family's base is its pipeline folder, which its constructor loads itself.)"""
        return bool(self._base_keys) and bool(self.lora_targets)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in self._base_keys:
            state.pop(key, None)

    def configure_optimizers(self):
        tc = self.trainer_cfg
        params = [p for p in self.parameters() if p.requires_grad]  # a LoRA model: its adapters
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------- generation
    def option_defaults(self) -> dict[str, Any]:
        """Each family option's default: the value in this model's config (None: decided per call)."""
        return {
            k: getattr(self.model_cfg, self.option_config_fields.get(k, k)) for k in self.generate_options
        }

    @torch.no_grad()
    def generate(
        self, prompts: list[str] | str, num_samples: int = 1, seed: int | None = None, **options: Any
    ) -> torch.Tensor:
        """``num_samples`` images per prompt as uint8 ``(N, C, H, W)``, N = len(prompts) * num_samples.

        Deterministic for a given ``seed`` on CPU. Family options (see ``generate_options``) override
        the config's defaults; an unknown option is an error.
        """
        unknown = sorted(set(options) - set(self.generate_options))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for family {self.family!r}; "
                f"allowed: {', '.join(self.generate_options) or 'none'}"
            )
        was_training = self.training
        self.eval()
        try:
            captions = expand_prompts(prompts, num_samples)
            g = make_generator(seed, self.device)
            images = self._generate(captions, g, **options)  # (N, C, H, W) in [-1, 1]
        finally:
            self.train(was_training)
        return to_uint8(images)

    def _generate(self, captions: list[str], generator: torch.Generator, **options: Any) -> torch.Tensor:
        """One image per caption, float in [-1, 1] ``(N, C, H, W)``; subclasses implement."""
        raise NotImplementedError


def _tolerate_missing_base(module: nn.Module, incompatible: Any) -> None:
    """load_state_dict post-hook: a base model's frozen weights (``base_weight_keys``) may be missing,
    as they are from the module's own checkpoints and exports; any other missing or unexpected key
    still fails a strict load."""
    base = getattr(module, "_base_keys", frozenset())
    if base:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in base]


def _drop_text_encoder_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
) -> None:
    """load_state_dict pre-hook of a family without a text encoder: drop the ``text_encoder.*``
    entries that checkpoints and exports of older versions carry (every family then built one), so
    they load under ``strict=True``. Only those keys: any other mismatch is still an error."""
    for key in [k for k in state_dict if k.startswith(prefix + TEXT_ENCODER_PREFIX)]:
        del state_dict[key]
