"""Stable-Diffusion-format pipelines (diffusers): fine-tune and sample a pretrained text-to-image model.

``model.pipeline`` names a diffusers pipeline folder (a local path or an fsspec URL) with
``unet/`` (``UNet2DConditionModel``), ``vae/`` (``AutoencoderKL``), ``text_encoder/``
(``CLIPTextModel``), ``tokenizer/`` (``CLIPTokenizer``) and ``scheduler/`` (a scheduler config):
the layout of Stable Diffusion 1.x/2.x. :class:`SDModule` wraps it as a :class:`GenerativeModule`.

Training (as diffusers' ``train_text_to_image.py`` / ``train_text_to_image_lora.py``): images are
encoded by the pipeline's own VAE (a sample of its posterior, times ``vae.config.scaling_factor``),
or, on a dataset ``aigc data encode --autoencoder PIPELINE`` wrote (``sd`` latents: the posterior
means, unscaled, encoded once instead of every step), read as they are and scaled; ``aigc train``
refuses latents another VAE made (:func:`check_dataset_vae`). The latents are noised at uniform
random timesteps by a DDPM over the scheduler config's schedule, and the UNet learns the scheduler's
``prediction_type`` (``epsilon``: the noise, ``v_prediction``: the velocity). ``model.snr_gamma``
weights the loss by min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy"): ``min(SNR_t, gamma) / SNR_t`` for epsilon, ``/ (SNR_t + 1)`` for v. Each
caption is replaced by ``""`` with probability ``model.cond_drop_prob`` (classifier-free guidance).
The VAE and text encoder are frozen; with ``model.lora`` the UNet is frozen too and only PEFT LoRA
adapters on its attention projections train (``unet.add_adapter``, diffusers' way), otherwise the
whole UNet trains.

Checkpoints hold only what trains: :meth:`SDModule.base_weight_keys` lists the frozen weights that
come from the pipeline folder; they are left out of Lightning checkpoints and rebuilt from
``model.pipeline`` by the constructor, and loading tolerates exactly those keys missing.

Sampling follows ``StableDiffusionPipeline.__call__`` step by step, so that diffusers itself gives
the same images for the same seed (:func:`export_diffusers` writes the diffusers layout back): the
scheduler class of the folder's config, one ``randn`` draw of all initial latents times
``init_noise_sigma``, ``scale_model_input``, guidance ``out_u + w (out_c - out_u)`` on a batch
``[uncond, cond]``, ``step(..., generator)`` and the VAE decode of ``latents / scaling_factor``.
diffusers treats ``guidance <= 1`` as the plain conditional model; here ``1`` is conditional and
``0`` unconditional, as in every aigc family, so the two agree for ``guidance >= 1``.

Editing (``edit_modes``: img2img, inpaint, interpolate; the contract is
:meth:`GenerativeModule.generate`'s and :meth:`GenerativeModule.interpolate`'s), in latent space:

- image-to-image, SDEdit as ``StableDiffusionImg2ImgPipeline``: of the ``steps`` the last
  ``floor(strength · steps)`` are run (times the scheduler's ``order``, with ``set_begin_index``:
  its ``get_timesteps``), from the input's latents noised by the scheduler's ``add_noise`` to the
  first of them. The input is encoded by the VAE (grey images repeated to RGB) to its posterior
  mean times ``scaling_factor``, as ``aigc data encode`` encodes, so nothing is drawn for it; the
  noise is text-to-image's starting noise, drawn first. So strength 1 starts from that noise (times
  ``init_noise_sigma``) as text-to-image does and gives its images bit for bit, and strength 0
  runs no step and returns the VAE reconstruction of the input (decode of the encoded mean), not
  the input itself. diffusers' img2img gives the same images (to a uint8 level) for the same seed,
  strength and steps when its ``image`` is those latents (4 channels, taken as they are); given
  the pixel image it first draws a posterior sample from the generator and then its noise, so
  neither its latents nor its noise are ours. At strength 1 diffusers still adds the input at the
  first timestep's weight, where aigc is text-to-image.
- inpainting, RePaint (Lugmayr et al. 2022) without its resampling jumps, as the diffusion
  family's latent models do: the mask is max-pooled to the latent grid (a latent cell that sees
  any masked pixel is regenerated); before every step at ``t`` the kept cells are set to the
  input's latents noised to ``t`` by ``add_noise`` with the same starting noise, and after the
  last step to the clean latents; ``generate`` pastes the kept pixels back after decoding.
- interpolation: slerp of the two seeds' starting noise, linear interpolation of the two prompts'
  CLIP embeddings (the unconditional half is the empty prompt's at both ends), sampled with the
  pipeline's scheduler at eta 0. A scheduler that draws noise in its steps
  (:data:`STOCHASTIC_SCHEDULERS`: DDPM, the ancestral, SDE and consistency samplers, or a
  DPM-Solver ``sde-`` algorithm) is replaced by a ``DDIMScheduler`` of the same config, so the
  end frames equal ``generate`` alone where the pipeline's scheduler is deterministic, and
  ``generate`` with a DDIM scheduler config otherwise; any other scheduler found drawing from the
  generator while sampling is a ValueError naming it.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aigc.models.base import (
    EditRequest,
    GenerativeModule,
    ModuleSpec,
    drop_captions,
    make_generator,
    pool_mask,
    slerp,
)

#: the subfolders a pipeline folder must have
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: the UNet layers LoRA adapts when ``model.lora.targets`` is empty: the attention projections, as
#: diffusers' train_text_to_image_lora.py
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
#: state_dict prefixes of the parts that are always frozen
FROZEN_PREFIXES = ("vae.", "text_encoder.")
#: seed of the fixed noise, timesteps and VAE samples of ``val/loss`` (comparable across steps)
VAL_SEED = 1234
#: where a pipeline given by URL is copied (one folder per URL); env var AIGC_PIPELINE_CACHE moves it
PIPELINE_CACHE_ENV = "AIGC_PIPELINE_CACHE"
#: the file an adapter export writes beside the LoRA weights: which base pipeline it adapts
BASE_FILE = "aigc-base.json"
#: diffusers schedulers whose steps draw noise (ancestral, SDE and consistency samplers):
#: interpolation samples with a DDIMScheduler of the same config instead
STOCHASTIC_SCHEDULERS = frozenset(
    {
        "DDPMScheduler",
        "DDPMParallelScheduler",
        "EulerAncestralDiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DPMSolverSDEScheduler",
        "LCMScheduler",
        "TCDScheduler",
    }
)


def local_pipeline(pipeline: str) -> Path:
    """The pipeline folder on local disk: a local path (or ``file://`` URL) as it is; any other
    fsspec URL is copied once into ``$AIGC_PIPELINE_CACHE`` (default ``~/.cache/aigc/pipelines``),
    one folder per URL, and read from there afterwards. Raises ``FileNotFoundError`` naming the
    subfolders a pipeline folder lacks."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(pipeline)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        folder = Path(path)
    else:
        root = Path(os.environ.get(PIPELINE_CACHE_ENV) or Path.home() / ".cache" / "aigc" / "pipelines")
        folder = root / hashlib.sha256(pipeline.encode()).hexdigest()[:16]
        if not (folder / "model_index.json").is_file() and not all(
            (folder / p).is_dir() for p in PIPELINE_PARTS
        ):
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".copy-", dir=root))
            try:
                fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)  # whole or not at all
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    missing = [p for p in PIPELINE_PARTS if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"model.pipeline={pipeline!r} is not a diffusers pipeline folder: "
            f"{', '.join(m + '/' for m in missing)} missing "
            f"(expected {', '.join(p + '/' for p in PIPELINE_PARTS)})"
        )
    return folder


@dataclass
class PipelineParts:
    """What a pipeline folder holds, loaded in float32 on the CPU."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: dict[str, Any]


def load_pipeline(folder: str | Path) -> PipelineParts:
    """Load the parts of a local pipeline folder (:func:`local_pipeline`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = str(folder)
    return PipelineParts(
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        scheduler_config=json.loads(
            (Path(folder) / "scheduler" / "scheduler_config.json").read_text("utf-8")
        ),
    )


def scheduler_from_config(config: dict[str, Any]) -> Any:
    """A fresh instance of the scheduler class the config names (``_class_name``)."""
    import diffusers

    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"scheduler config names {name!r}, which diffusers does not have")
    return cls.from_config(config)


def min_snr_weights(
    alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, prediction: str
) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023) at timesteps ``t`` (B,):
    ``min(SNR, gamma) / SNR`` for an epsilon target, ``min(SNR, gamma) / (SNR + 1)`` for v, with
    ``SNR_t = abar_t / (1 - abar_t)`` (diffusers.training_utils.compute_snr's)."""
    abar = alphas_cumprod.to(t.device)[t].float()
    snr = abar / (1 - abar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction == "v_prediction" else clipped / snr


def vae_posterior(vae: Any, images: torch.Tensor) -> Any:
    """The pipeline VAE's posterior ``latent_dist`` of images ``(n, C, H, W)`` in [-1, 1], grey ones
    repeated to RGB (the VAE reads 3 channels): what training samples, editing and ``aigc data
    encode`` take the mean of (unscaled: ``scaling_factor`` is applied by the caller)."""
    x = images.to(vae.device, torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return vae.encode(x.contiguous()).latent_dist


def check_dataset_vae(pipeline: str, location: str, manifest: dict[str, Any] | None = None) -> None:
    """Refuse ``sd`` latents (``aigc data encode --autoencoder PIPELINE``) that another VAE than
    ``pipeline``'s encoded: the UNet would learn latents its VAE decodes to something else. The VAE
    the dataset carries (``autoencoder/``, checked against the manifest's sha256) is compared tensor
    by tensor with the one ``pipeline`` loads. Raises ``ValueError`` saying how to re-encode."""
    import fsspec
    from diffusers import AutoencoderKL
    from safetensors.torch import load as load_safetensors

    from aigc.data.latents import autoencoder_location, latent_spec
    from aigc.data.manifest import read_manifest

    spec = latent_spec(manifest or read_manifest(location)) or {}
    where = f"{autoencoder_location(location)}/diffusion_pytorch_model.safetensors"
    try:
        with fsspec.open(where, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{where}: missing; re-encode the dataset (aigc data encode)") from None
    if hashlib.sha256(data).hexdigest() != spec.get("autoencoder_sha256"):
        raise ValueError(f"{where}: sha256 differs from the manifest's; re-encode it (aigc data encode)")
    theirs = load_safetensors(data)
    ours = AutoencoderKL.from_pretrained(str(local_pipeline(pipeline)), subfolder="vae").state_dict()
    differ = sorted(
        k
        for k in theirs.keys() | ours.keys()
        if k not in theirs or k not in ours or not torch.equal(theirs[k].float(), ours[k].float())
    )
    if differ:
        raise ValueError(
            f"{location} holds latents of another VAE than model.pipeline={pipeline!r}'s "
            f"({len(differ)} of {len(ours)} tensors differ, e.g. {differ[0]}): re-encode its images "
            f"with `aigc data encode IMAGES --autoencoder {pipeline}`"
        )


class SDModule(GenerativeModule):
    """A diffusers Stable-Diffusion-format pipeline; ``generate(..., steps, guidance)``."""

    family = "sd"
    own_text_encoder = True
    #: a dataset ``aigc data encode`` wrote with this pipeline's VAE: its posterior means, unscaled
    latent_kinds = ("sd",)
    generate_options = {"steps": int, "guidance": float}
    option_config_fields = {"steps": "sample_steps"}
    edit_modes = frozenset({"img2img", "inpaint", "interpolate"})

    def build_nets(self, spec: ModuleSpec) -> None:
        c = spec.model
        parts = load_pipeline(local_pipeline(c.pipeline))
        self.vae = parts.vae.requires_grad_(False).eval()
        self.text_encoder = parts.text_encoder.requires_grad_(False).eval()
        self.clip_tokenizer = parts.tokenizer
        self.unet = parts.unet
        self.scheduler_config = parts.scheduler_config
        # Training noises by the forward process of the config's schedule, whatever the sampler.
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"{c.pipeline}: scheduler prediction_type {self.prediction_type!r}; the sd family "
                "trains epsilon or v_prediction pipelines"
            )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if spec.image_size % (self.vae_scale_factor * unet_factor):
            raise ValueError(
                f"image size {spec.image_size} (data.image_size) must be a multiple of "
                f"{self.vae_scale_factor * unet_factor} for this pipeline (its VAE downsamples by "
                f"{self.vae_scale_factor}, its UNet by {unet_factor})"
            )
        if spec.channels not in (1, 3):
            raise ValueError(f"the sd family reads RGB (or grey) images, got {spec.channels} channels")
        if spec.latent is not None and tuple(spec.latent["shape"]) != self.latent_shape:
            raise ValueError(
                f"the dataset's sd latents are {tuple(spec.latent['shape'])}; this pipeline's VAE makes "
                f"{self.latent_shape} at image size {spec.image_size}: re-encode the images with "
                f"`aigc data encode --autoencoder {c.pipeline}`"
            )
        if c.lora is not None:
            from peft import LoraConfig

            self.unet.requires_grad_(False)
            self.unet.add_adapter(
                LoraConfig(
                    r=c.lora.rank,
                    lora_alpha=c.lora.alpha if c.lora.alpha is not None else c.lora.rank,
                    target_modules=list(c.lora.targets or DEFAULT_LORA_TARGETS),
                    lora_dropout=c.lora.dropout,
                    init_lora_weights="gaussian",
                )
            )
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        self._base_keys = frozenset(
            k
            for k in self.state_dict()
            if k.startswith(FROZEN_PREFIXES)
            or (k.startswith("unet.") and c.lora is not None and k not in trained)
        )
        # GenerativeModule's base-weight mechanism (base_weight_keys, on_save_checkpoint and the load
        # hook) leaves these out of checkpoints and exports; the constructor rebuilds them.

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen parts: never in training mode (dropout)
        self.text_encoder.eval()
        return self

    def configure_optimizers(self):
        tc = self.trainer_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------ text
    @torch.no_grad()
    def prompt_embeds(self, captions: list[str]) -> torch.Tensor:
        """captions -> the CLIP text encoder's last hidden states (B, T, D), as
        ``StableDiffusionPipeline.encode_prompt`` makes them (padded to the tokenizer's length)."""
        tok = self._tokenize(captions)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(self.device)
        return self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]

    def _tokenize(self, captions: list[str]) -> Any:
        """The CLIP tokenizer's ids and mask, padded and truncated to its ``model_max_length``."""
        return self.clip_tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """captions -> tokens (B, T, D), mask (B, T), pooled (B, D) from the pipeline's CLIP."""
        tok = self._tokenize(captions)
        with torch.no_grad():
            out = self.text_encoder(tok.input_ids.to(self.device))
        return out.last_hidden_state, tok.attention_mask.to(self.device).bool(), out.pooler_output

    # -------------------------------------------------------------------------------- training
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The UNet's input for one image: ``(latent channels, H / f, W / f)``."""
        h = self.image_size // self.vae_scale_factor
        return (int(self.vae.config.latent_channels), h, h)

    @torch.no_grad()
    def latents(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The batch's latents times the VAE's scaling factor: ``batch["image"]`` is either images
        (B, C, H, W) in [-1, 1] (grey ones are repeated to RGB), encoded by the VAE (a posterior
        sample drawn from ``generator``), or latents already encoded, ``(B, *latent_shape)``."""
        x = batch["image"]
        sf = float(self.vae.config.scaling_factor)
        if x.dim() == 4 and tuple(x.shape[1:]) == self.latent_shape:
            return x.to(self.device, torch.float32) * sf
        if x.dim() != 4 or x.shape[1] not in (1, 3) or tuple(x.shape[2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"batch['image'] has shape {tuple(x.shape)}; the model expects images "
                f"(B, 3, {self.image_size}, {self.image_size}) or latents (B, *{self.latent_shape})"
            )
        return vae_posterior(self.vae, x).sample(generator=generator) * sf

    def loss(
        self, latents: torch.Tensor, captions: list[str], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-sample loss ``(B,)``: the UNet's output against the scheduler's target (noise or v) at
        uniform random timesteps, min-SNR weighted with ``model.snr_gamma``; noise and timesteps
        from ``generator`` (the global RNG when None)."""
        b = latents.shape[0]
        sched = self.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        t = torch.randint(
            0, sched.config.num_train_timesteps, (b,), generator=generator, device=latents.device
        )
        noisy = sched.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=self.prompt_embeds(captions)).sample
        err = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
        gamma = self.model_cfg.snr_gamma
        if gamma is not None:
            err = err * min_snr_weights(sched.alphas_cumprod, t, gamma, self.prediction_type)
        return err

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        latents = self.latents(batch)
        captions = drop_captions(list(batch["caption"]), self.model_cfg.cond_drop_prob)
        loss = self.loss(latents, captions).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """``val/loss`` on fixed-seed VAE samples, noise and timesteps; padding repeats left out."""
        g = torch.Generator(device=self.device).manual_seed(VAL_SEED + batch_idx)
        per_sample = self.loss(self.latents(batch, g), list(batch["caption"]), generator=g)
        valid = batch.get("valid")
        if valid is not None:
            per_sample = per_sample[valid.to(per_sample.device).bool()]
        loss = per_sample.mean() if per_sample.numel() else per_sample.sum()
        self.log("val/loss", loss, prog_bar=True, batch_size=max(1, per_sample.numel()), sync_dist=True)
        return loss

    # ------------------------------------------------------------------------------ generation
    def _sampling(self, steps: int | None, guidance: float | None) -> tuple[int, float]:
        """The options resolved against the config and checked: ``(steps, guidance)``."""
        c = self.model_cfg
        steps = int(c.sample_steps if steps is None else steps)
        guidance = float(c.guidance if guidance is None else guidance)
        if steps < 1:
            raise ValueError(f"option steps must be >= 1, got {steps}")
        if guidance < 0:
            raise ValueError(f"option guidance must be >= 0, got {guidance}")
        return steps, guidance

    def _scheduler(self, steps: int, config: dict[str, Any] | None = None) -> Any:
        """A fresh scheduler of ``config``'s class (default the pipeline's), set to ``steps`` steps: one
        per sampling run, as ``set_timesteps`` and ``step`` mutate it (and serving may call concurrently)."""
        sched = scheduler_from_config(self.scheduler_config if config is None else config)
        if steps > sched.config.num_train_timesteps:
            raise ValueError(f"option steps must be <= {sched.config.num_train_timesteps}, got {steps}")
        sched.set_timesteps(steps, device=self.device)
        return sched

    def _text(self, captions: list[str], guidance: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's ``(cond, uncond)`` text embeddings: uncond (the empty prompt's) None where
        guidance is 1; guidance 0 runs the unconditional model alone, as ``(uncond, None)``."""
        cond = self.prompt_embeds(captions)  # (n, T, D)
        uncond = self.prompt_embeds([""]).expand(len(captions), -1, -1) if guidance != 1 else None
        if guidance == 0:
            return uncond, None
        return cond, uncond

    def _initial_noise(self, n: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """The starting noise ``(n, *latent_shape)``: one ``randn_tensor`` draw, as diffusers draws it
        (before the scale ``init_noise_sigma``)."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((n, *self.latent_shape), generator=generator, device=self.device, dtype=dtype)

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        sched: Any,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        guidance: float,
        generator: torch.Generator,
        known: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run ``sched`` over ``timesteps`` from ``latents``; decoded pixels in [-1, 1].

        ``known = (x0, noise, keep)`` inpaints (RePaint without resampling): before each step at
        ``t`` the latent cells where ``keep (n, 1, h, w)`` is True are set to ``x0`` noised to ``t``
        with ``noise`` (the scheduler's ``add_noise``), and after the last step to ``x0``.
        """
        accepted = set(inspect.signature(sched.step).parameters)
        extra = {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in accepted}
        embeds = cond if uncond is None else torch.cat([uncond, cond])
        for t in timesteps:
            if known is not None:
                x0, noise, keep = known
                noised = sched.add_noise(x0, noise, t.reshape(1).repeat(latents.shape[0]))
                latents = torch.where(keep, noised, latents)
            x = latents if uncond is None else torch.cat([latents, latents])
            x = sched.scale_model_input(x, t)
            out = self.unet(x, t, encoder_hidden_states=embeds).sample
            if uncond is not None:
                out_u, out_c = out.chunk(2)
                out = out_u + guidance * (out_c - out_u)
            latents = sched.step(out, t, latents, **extra, return_dict=False)[0]
        if known is not None:
            latents = torch.where(known[2], known[0], latents)
        images = self.vae.decode(latents / float(self.vae.config.scaling_factor)).sample
        if self.channels == 1:
            images = images.mean(1, keepdim=True)
        return images.clamp(-1, 1)

    def _generate(
        self,
        captions: list[str],
        generator: torch.Generator,
        steps: int | None = None,
        guidance: float | None = None,
        edit: EditRequest | None = None,
    ) -> torch.Tensor:
        steps, guidance = self._sampling(steps, guidance)
        sched = self._scheduler(steps)
        n = len(captions)
        cond, uncond = self._text(captions, guidance)
        noise = self._initial_noise(n, generator, cond.dtype)  # the first draw, edit or not
        latents = noise * sched.init_noise_sigma
        timesteps = sched.timesteps
        known = None
        if edit is not None:
            # SDEdit as StableDiffusionImg2ImgPipeline.get_timesteps: the last floor(strength * steps)
            # steps (times the scheduler's order), from the input noised to the first of them.
            t_start = steps - min(int(steps * edit.strength), steps)
            timesteps = timesteps[t_start * sched.order :]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start * sched.order)
            x0 = self._edit_latents(edit.images)  # (n, *latent_shape)
            if len(timesteps) == 0:  # strength 0: the input's VAE reconstruction
                latents = x0
            elif t_start > 0:  # strength 1 starts from the noise itself, as text-to-image does
                latents = sched.add_noise(x0, noise, timesteps[:1].repeat(n))
            if edit.masks is not None:
                known = (x0, noise, ~self._edit_mask(edit.masks))
        return self._denoise(latents, timesteps, sched, cond, uncond, guidance, generator, known)

    def _edit_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Edit inputs ``(n, C, H, W)`` in [-1, 1] -> the VAE's posterior mean times ``scaling_factor``
        (grey images repeated to RGB), as ``aigc data encode`` encodes them: no draw from the generator."""
        return vae_posterior(self.vae, images).mean * float(self.vae.config.scaling_factor)

    def _edit_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """Regenerate-masks ``(n, 1, H, W)`` bool max-pooled to the latent grid ``(h, w)``: a latent
        cell that sees any masked pixel is regenerated."""
        return pool_mask(masks, self.latent_shape[-2:])

    def _interpolation_scheduler(self) -> dict[str, Any]:
        """The scheduler config interpolation samples with: the pipeline's own, or, where its class
        draws noise in its steps (:data:`STOCHASTIC_SCHEDULERS`, a DPM-Solver ``sde-`` algorithm),
        a ``DDIMScheduler`` of the same config (deterministic at eta 0)."""
        config = self.scheduler_config
        name = config.get("_class_name", "DDPMScheduler")
        if name in STOCHASTIC_SCHEDULERS or str(config.get("algorithm_type", "")).startswith("sde-"):
            return {**config, "_class_name": "DDIMScheduler"}
        return config

    def _interpolate(
        self,
        prompt_a: str,
        prompt_b: str,
        frames: int,
        seed: int,
        seed_b: int,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Frames ``(frames, C, H, W)`` in [-1, 1] (see GenerativeModule.interpolate): slerp of the two
        seeds' starting noise, lerp of the two prompts' CLIP embeddings, deterministic sampling.

        The end frames are sampled alone, from the end points' own noise and embeddings, as
        ``generate`` samples one caption: so they are its images bit for bit (with the pipeline's
        scheduler, or with DDIM where that one is stochastic: :meth:`_interpolation_scheduler`). The
        frames between are one batch. A scheduler that still draws from the generator while
        sampling is a ValueError naming it.
        """
        steps, guidance = self._sampling(steps, guidance)
        config = self._interpolation_scheduler()
        texts = [self._text([p], guidance) for p in (prompt_a, prompt_b)]  # (cond, uncond), (1, T, D)
        # each seed's starting noise as generate() draws it for one caption: a fresh generator's first draw
        dtype = texts[0][0].dtype
        ends = [self._initial_noise(1, make_generator(s, self.device), dtype) for s in (seed, seed_b)]
        weights = [i / (frames - 1) for i in range(frames)]
        noise = slerp(ends[0], ends[1], weights)  # (frames, *latent_shape)

        def run(rows: slice, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
            sched = self._scheduler(steps, config)
            g = make_generator(0, self.device)  # a deterministic sampler draws nothing from it
            state = g.get_state()
            latents = noise[rows] * sched.init_noise_sigma
            images = self._denoise(latents, sched.timesteps, sched, cond, uncond, guidance, g)
            if not torch.equal(g.get_state(), state):
                raise ValueError(
                    f"interpolate needs a deterministic sampler; the pipeline's scheduler "
                    f"{config.get('_class_name')!r} draws noise while sampling"
                )
            return images

        first, last = run(slice(0, 1), *texts[0]), run(slice(frames - 1, frames), *texts[1])
        if frames == 2:
            return torch.cat([first, last])
        w = torch.tensor(weights[1:-1], device=self.device)[:, None, None]  # (frames - 2, 1, 1)
        (ca, ua), (cb, _) = texts
        cond = torch.lerp(ca, cb, w.to(ca.dtype))  # (frames - 2, T, D)
        # the unconditional half is the empty prompt's at both ends (guidance 0: it is the cond)
        uncond = None if ua is None else ua.expand(frames - 2, -1, -1)
        return torch.cat([first, run(slice(1, frames - 1), cond, uncond), last])


# ------------------------------------------------------------------------------------- export


def lora_state_dict(module: SDModule) -> dict[str, torch.Tensor]:
    """The UNet's LoRA adapter in diffusers' key format (``StableDiffusionPipeline.load_lora_weights``)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module.unet))


def export_diffusers(module: SDModule, out_dir: str | Path, merge: bool = False) -> Path:
    """Write ``module`` in diffusers' layout at ``out_dir``; returns it.

    A fully fine-tuned model (or a LoRA one with ``merge=True``, adapters merged into the UNet's
    weights) is written as a whole pipeline folder that ``StableDiffusionPipeline.from_pretrained``
    loads. A LoRA model without ``merge`` is written as its adapter alone
    (``pytorch_lora_weights.safetensors``, with its PEFT config as metadata, so the scale alpha / r
    comes along) plus ``aigc-base.json`` naming ``model.pipeline``: load the base pipeline and then
    ``pipe.load_lora_weights(out_dir)``.
    """
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora = module.model_cfg.lora is not None
    if lora and not merge:
        StableDiffusionPipeline.save_lora_weights(
            out,
            unet_lora_layers=lora_state_dict(module),
            unet_lora_adapter_metadata=module.unet.peft_config["default"].to_dict(),
        )
        base = {"pipeline": module.model_cfg.pipeline, "lora": module.model_cfg.lora.model_dump(mode="json")}
        (out / BASE_FILE).write_text(json.dumps(base, indent=2), encoding="utf-8")
        return out
    unet = module.unet
    if lora:  # merged: W + (alpha / r) B A in the base weights, the adapter layers removed
        unet = copy.deepcopy(unet)
        unet.fuse_lora()
        unet.unload_lora()
    pipe = StableDiffusionPipeline(
        vae=module.vae,
        text_encoder=module.text_encoder,
        tokenizer=module.clip_tokenizer,
        unet=unet,
        scheduler=scheduler_from_config(module.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def merged_module(module: SDModule) -> SDModule:
    """A LoRA model as a fully fine-tuned one: a copy of the UNet with the adapters merged into its
    weights (``W + alpha / r B A``, diffusers' ``fuse_lora``), in a new module whose ``model.lora`` is
    unset. The new module's frozen parts come from ``model.pipeline`` again (its constructor)."""
    if module.model_cfg.lora is None:
        raise ValueError("the model has no LoRA adapters (model.lora is not set): nothing to merge")
    unet = copy.deepcopy(module.unet)
    unet.fuse_lora()
    unet.unload_lora()
    model = module.model_cfg.model_dump(mode="json")
    model["lora"] = None
    merged = type(module)(
        model=model,
        tokenizer=module.tokenizer.to_dict(),
        image_size=module.image_size,
        channels=module.channels,
        trainer=module.hparams.get("trainer"),
        latent=module.latent,
    )
    merged.unet.load_state_dict(unet.state_dict())
    return merged.to(module.device).eval()
