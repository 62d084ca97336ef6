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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
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


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1], the inverse of :func:`to_uint8` (exact after
    its rounding: ``to_uint8(from_uint8(x)) == x``)."""
    return images.float() / 127.5 - 1.0


def slerp(a: torch.Tensor, b: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Spherical interpolation of two noise tensors ``(1, *S)`` at each weight: ``(len(weights), *S)``.

    ``sin((1-w) θ)/sin θ · a + sin(w θ)/sin θ · b`` with θ the angle between ``a`` and ``b``
    (Shoemake 1985; White 2016, *Sampling Generative Networks*, for Gaussian latents; DDIM, Song et
    al. 2021, sec. 5.4, interpolates its ``x_T`` so). High-dimensional Gaussian noise lies near a
    sphere, which a linear blend leaves (its midpoint has ~0.7 of the norm). The coefficients are
    computed in float64; weight 0 returns ``a`` and weight 1 returns ``b`` exactly. Parallel inputs
    (θ ≈ 0, e.g. the same seed) fall back to the linear blend.
    """
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = float((fa @ fb) / (fa.norm() * fb.norm()).clamp(min=1e-300))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    rows = []
    for w in weights:
        if w == 0:
            rows.append(a)
        elif w == 1:
            rows.append(b)
        elif theta < 1e-4:
            rows.append(torch.lerp(a, b, float(w)))
        else:
            ca = math.sin((1 - w) * theta) / math.sin(theta)
            cb = math.sin(w * theta) / math.sin(theta)
            rows.append(ca * a + cb * b)
    return torch.cat(rows)


def latent_walk(
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ends: tuple[torch.Tensor, torch.Tensor],
    texts: tuple[torch.Tensor, torch.Tensor],
    frames: int,
) -> torch.Tensor:
    """Frames ``(frames, ...)`` of a one-pass decoder ``decode(z, text)`` (a VAE's decoder, a GAN's
    generator) from ``(ends[0], texts[0])`` to ``(ends[1], texts[1])``, each ``(1, ...)``: slerp of the
    latents, linear interpolation of the text features. The end frames are decoded alone, from the
    ends' own latent and feature as ``generate`` decodes one caption, so they are its images bit for
    bit; the frames between are one batch."""
    weights = [i / (frames - 1) for i in range(frames)]
    z = slerp(ends[0], ends[1], weights)  # (frames, ...); rows 0 and -1 are the ends exactly
    first, last = decode(z[:1], texts[0]), decode(z[-1:], texts[1])
    if frames == 2:
        return torch.cat([first, last])
    w = torch.tensor(weights[1:-1], device=z.device)[:, None]  # (frames - 2, 1)
    middle = decode(z[1:-1], torch.lerp(texts[0], texts[1], w))
    return torch.cat([first, middle, last])


def pool_mask(masks: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Regenerate-masks ``(n, 1, H, W)`` bool max-pooled to a latent or code grid ``(h, w)``: a cell
    that sees any masked pixel is regenerated (inpainting through an autoencoder)."""
    return F.adaptive_max_pool2d(masks.float(), tuple(grid)) > 0


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


#: The editing operations of ``generate`` and ``interpolate``, which a family lists in its
#: ``edit_modes``: image-to-image (``init_images``, ``strength``), inpainting (``masks``) and
#: interpolation between two prompts and/or seeds (:meth:`GenerativeModule.interpolate`).
EDIT_MODES = ("img2img", "inpaint", "interpolate")
#: ``strength`` when ``init_images`` is given without one: image-to-image keeps the input's layout
#: and colours and redraws its detail (SDEdit, Meng et al. 2022, found its balance of realism and
#: faithfulness at t0 of about 0.3-0.6 of T). Inpainting (masks, no strength) defaults to 1.0: the
#: masked region drawn from pure noise.
DEFAULT_STRENGTH = 0.6


@dataclass(frozen=True)
class EditRequest:
    """Image-to-image / inpainting as :meth:`GenerativeModule.generate` hands it to a family's
    ``_generate(captions, generator, edit=..., **options)``: one row per caption, on the module's device.

    ``images`` float32 ``(N, C, H, W)`` in [-1, 1] (the pixel images, also for a latent model);
    ``strength`` in [0, 1]; ``masks`` bool ``(N, 1, H, W)``, True = regenerate, or None (img2img).
    """

    images: torch.Tensor
    strength: float
    masks: torch.Tensor | None = None


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
    #: the editing operations (a subset of EDIT_MODES) the family implements: ``img2img`` and
    #: ``inpaint`` reach its ``_generate`` as an ``edit=`` :class:`EditRequest`, ``interpolate`` its
    #: ``_interpolate``; anything else is refused by generate()/interpolate() naming what it supports
    edit_modes: ClassVar[frozenset[str]] = frozenset()

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
        self,
        prompts: list[str] | str,
        num_samples: int = 1,
        seed: int | None = None,
        *,
        init_images: torch.Tensor | None = None,
        strength: float | None = None,
        masks: torch.Tensor | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """``num_samples`` images per prompt as uint8 ``(N, C, H, W)``, N = len(prompts) * num_samples.

        Deterministic for a given ``seed`` on CPU. Family options (see ``generate_options``) override
        the config's defaults; an unknown option is an error.

        Editing, where the family lists the operation in ``edit_modes`` (else a ValueError
        naming the family and what it supports):

        - **image-to-image** (``"img2img"``): ``init_images`` uint8 in [0, 255] (the format generate
          returns), ``(N, C, H, W)`` or one image ``(C, H, W)`` / ``(1, C, H, W)`` for all N rows, of
          the model's ``(channels, image_size, image_size)``. ``strength`` in [0, 1] (default
          :data:`DEFAULT_STRENGTH`) is how much of the sampling chain is run from the noised input:
          for diffusion SDEdit (Meng et al. 2022, *SDEdit: Guided Image Synthesis and Editing with
          Stochastic Differential Equations*): the input is noised to the schedule's timestep at
          ``strength · T`` and denoised from there with the prompt (the VAE mixes its latents,
          see :mod:`aigc.models.vae`). Strength 0 returns the input (a latent model: its
          autoencoder reconstruction; the VAE: its reconstruction with the prompt); strength 1
          ignores it and equals text-to-image with the same seed, bit for bit.
        - **inpainting** (``"inpaint"``): ``masks`` ``(N, 1, H, W)`` or one ``(1, H, W)`` /
          ``(1, 1, H, W)`` for all rows, bool or numbers that are all 0 or 1; 1 = regenerate, 0 =
          keep. Needs ``init_images``; ``strength`` defaults to 1 (the region drawn from pure noise).
          The kept pixels of the result are the input's exactly: a family may change them while
          sampling (a latent model's regenerated latent cells reach a little beyond the mask), and
          they are pasted back here, after the conversion to uint8.

        Interpolation is :meth:`interpolate`.
        """
        self._check_options(options)
        captions = expand_prompts(prompts, num_samples)
        edit = self._edit_request(len(captions), init_images, strength, masks)
        with self._evaluating():
            g = make_generator(seed, self.device)
            if edit is None:
                images = self._generate(captions, g, **options)  # (N, C, H, W) in [-1, 1]
            else:
                images = self._generate(captions, g, edit=edit, **options)
        out = to_uint8(images)
        if edit is not None and edit.masks is not None:  # the kept pixels are the input's, exactly
            out = torch.where(edit.masks.cpu(), out, to_uint8(edit.images))
        return out

    @torch.no_grad()
    def interpolate(
        self,
        prompt_a: str,
        prompt_b: str | None = None,
        frames: int = 8,
        seed: int = 0,
        seed_b: int | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """``frames`` images from ``(prompt_a, seed)`` to ``(prompt_b, seed_b)``, uint8
        ``(frames, C, H, W)``: a walk through the model's latent space.

        ``prompt_b`` defaults to ``prompt_a`` and ``seed_b`` to ``seed``; at least one must differ.
        Frame ``i`` sits at weight ``w = i / (frames - 1)``: the starting noise is interpolated
        spherically (:func:`slerp`) between the seeds' and the text features linearly between the
        prompts', and sampling is deterministic, so neighbouring frames are neighbours. The first
        frame equals ``generate([prompt_a], seed=seed, **options)`` and the last
        ``generate([prompt_b], seed=seed_b, **options)`` with the family's deterministic sampler
        (diffusion: ``sampler="ddim"``, forced; ``sampler="ddpm"`` is an error). Options as in
        :meth:`generate`; a family without ``"interpolate"`` in ``edit_modes`` raises a ValueError.
        """
        self._require_edit_mode("interpolate", "interpolate()")
        self._check_options(options)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise ValueError(f"frames must be an integer >= 2, got {frames!r}")
        for name, value in (("seed", seed), ("seed_b", seed_b)):
            if (value is not None or name == "seed") and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        prompt_b = prompt_a if prompt_b is None else prompt_b
        seed_b = seed if seed_b is None else seed_b
        if not isinstance(prompt_a, str) or not isinstance(prompt_b, str):
            raise ValueError("prompt_a and prompt_b must be strings (use '' for unconditional frames)")
        if prompt_a == prompt_b and seed == seed_b:
            raise ValueError("interpolate needs two different end points: give prompt_b and/or seed_b")
        with self._evaluating():
            images = self._interpolate(prompt_a, prompt_b, frames, seed, seed_b, **options)
        return to_uint8(images)

    def _interpolate(
        self, prompt_a: str, prompt_b: str, frames: int, seed: int, seed_b: int, **options: Any
    ) -> torch.Tensor:
        """``frames`` images ``(frames, C, H, W)`` in [-1, 1] from a to b; families with
        ``"interpolate"`` in ``edit_modes`` implement (see :meth:`interpolate`)."""
        raise NotImplementedError

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode for the block, then the train/eval mode the module had."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _check_options(self, options: dict[str, Any]) -> None:
        """An option the family does not declare in ``generate_options`` is an error naming them."""
        unknown = sorted(set(options) - set(self.generate_options))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for family {self.family!r}; "
                f"allowed: {', '.join(self.generate_options) or 'none'}"
            )

    def _require_edit_mode(self, mode: str, what: str) -> None:
        """A ValueError naming the family and its editing operations unless it supports ``mode``."""
        if mode not in self.edit_modes:
            supported = ", ".join(m for m in EDIT_MODES if m in self.edit_modes) or "none"
            raise ValueError(
                f"family {self.family!r} does not support {mode} ({what}); "
                f"its editing operations: {supported}"
            )

    def _edit_request(
        self,
        n: int,
        init_images: torch.Tensor | None,
        strength: float | None,
        masks: torch.Tensor | None,
    ) -> EditRequest | None:
        """generate()'s editing arguments checked and shaped into one row per caption (or None)."""
        if init_images is None:
            if masks is not None:
                raise ValueError("masks need init_images: the image whose masked region is regenerated")
            if strength is not None:
                raise ValueError("strength needs init_images: the image that image-to-image starts from")
            return None
        if masks is None:
            self._require_edit_mode("img2img", "init_images")
        else:
            self._require_edit_mode("inpaint", "masks")
        if strength is None:
            strength = DEFAULT_STRENGTH if masks is None else 1.0
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        size, c = self.image_size, self.channels
        images = _rows(init_images, n, (c, size, size), "init_images")
        if images.dtype != torch.uint8:
            raise ValueError(
                f"init_images must be uint8 in [0, 255] (as generate returns), got {images.dtype}"
            )
        mask_rows = None
        if masks is not None:
            mask_rows = _rows(masks, n, (1, size, size), "masks")
            if mask_rows.dtype != torch.bool:
                if not bool(((mask_rows == 0) | (mask_rows == 1)).all()):
                    raise ValueError(
                        "masks must be bool or hold only 0 and 1 (1 = regenerate); "
                        "for a 0-255 mask image pass mask > 127"
                    )
                mask_rows = mask_rows == 1
            mask_rows = mask_rows.to(self.device)
        return EditRequest(from_uint8(images).to(self.device), float(strength), mask_rows)

    def _generate(self, captions: list[str], generator: torch.Generator, **options: Any) -> torch.Tensor:
        """One image per caption, float in [-1, 1] ``(N, C, H, W)``; subclasses implement."""
        raise NotImplementedError


def _rows(x: torch.Tensor, n: int, shape: tuple[int, int, int], name: str) -> torch.Tensor:
    """``x`` ``(C, H, W)``, ``(1, C, H, W)`` or ``(n, C, H, W)`` of ``shape = (C, H, W)`` -> ``(n, C, H, W)``
    (a broadcast view where one row serves all); any other shape is a ValueError naming both."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, {', '.join(map(str, shape))})")
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or tuple(x.shape[1:]) != shape or x.shape[0] not in (1, n):
        want = ", ".join(map(str, shape))
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; expected ({n}, {want}) (one per image: "
            f"len(prompts) * num_samples = {n}), or (1, {want}) / ({want}) for all of them"
        )
    return x.expand(n, *shape)


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
