"""Autoregressive family: an image as a raster sequence of quantised pixel tokens, after the caption.

Each channel value in [-1, 1] is quantised to one of ``levels`` tokens (PixelCNN, van den Oord et
al. 2016; Image GPT, Chen et al. 2020, which also orders pixels in raster order). The sequence is
raster order with the channels of a pixel interleaved: ``r00 g00 b00 r01 g01 b01 ...``; a
grey image is just ``p00 p01 ...``. Its length is ``H * W * C``, which is why this family stops at
32x32 (3072 tokens for RGB).

The caption conditions through a *prefix*: the shared text encoder's per-token features
``(B, T_text, D)`` are projected into the transformer's width and placed before the image
tokens, with padding masked out. A learned start token follows the prefix, so the sequence fed to
the transformer is ``[text_0 .. text_{P-1}, <start>, x_0 .. x_{N-2}]`` and the outputs at the last
``N`` positions predict ``x_0 .. x_{N-1}``. The loss is the cross-entropy on image tokens only
(nats per image token; ``/ ln 2`` gives bits per dimension, as PixelCNN papers report).

Captions are dropped to ``""`` with probability ``cond_drop_prob`` while training so the same net
also models images unconditionally; sampling can then use classifier-free guidance (Ho & Salimans
2022) on the logits: ``uncond + guidance * (cond - uncond)``. ``guidance = 1`` is plain sampling.
Sampling feeds one token per step through the KV cache; all randomness comes from the generator.

Latent autoregression (VQGAN's second stage, Esser et al. 2021, *Taming Transformers*): trained on
a latent dataset of VQ codes (``aigc data encode`` with a VQ autoencoder), the tokens are the
autoencoder's code indices ``(h, w)`` in raster order instead of quantised pixels (the vocabulary is
the codebook, ``model.levels`` is unused), so a 64x64 RGB image is 256 tokens instead of 12,288;
``generate`` decodes the sampled codes with the autoencoder the model carries.

Editing (``edit_modes``: inpaint only; the contract is :meth:`GenerativeModule.generate`'s):
inpainting over tokens, as far as the raster order allows. The input image becomes tokens (pixel
tokens by :func:`quantise`, the training quantisation; a VQ latent model encodes it to codes with
the autoencoder it carries) and the regenerate-mask is mapped onto the token sequence (pixel tokens:
each pixel's mask repeated for its interleaved channels; VQ codes: max-pooled to the code grid, so a
code cell that sees any masked pixel is regenerated). Sampling then runs as text-to-image does, one
token at a time through the KV cache, but a kept position is *forced*: the multinomial is drawn for
it as for any position and then overwritten by the input's token, which is fed to the cache as if it
had been sampled (with guidance, to the conditional and unconditional halves alike). So an all-ones
mask gives text-to-image's images bit for bit for the same seed. The limitation is the raster order:
a masked token is conditioned on every token before it, known or sampled, but not on the known
tokens after it: a masked region is drawn without the kept pixels to its right on the same rows and
on the rows below (a masked top half without the bottom half it must join), so a seam may show
there. Sampling stops after the last masked token of a chunk: the tokens after it are the input's,
and nothing more is drawn. A VQ model decodes the kept cells from the input's codes (its
autoencoder's reconstruction); ``generate`` pastes the kept pixels back exactly, for pixel tokens
too (quantised to ``levels``). ``strength`` has no meaning here: only the default (1) is accepted.
Image-to-image (``init_images`` without ``masks``) is not supported: ancestral sampling has no
noise level to start part-way from.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from aigc.models.base import EditRequest, GenerativeModule, ModuleSpec, drop_captions, pool_mask, valid_rows
from aigc.models.nets.transformer import GPT, GPTConfig

MAX_IMAGE_SIZE = 32
SAMPLE_CHUNK = 256  # captions decoded at once; bounds the KV cache's memory at 32x32 RGB


def quantise(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Images in [-1, 1] ``(B, C, H, W)`` -> raster tokens ``(B, H*W*C)`` in 0..levels-1."""
    q = ((images.float().clamp(-1, 1) + 1) * 0.5 * (levels - 1)).round().long()
    return q.permute(0, 2, 3, 1).reshape(images.shape[0], -1)  # channels interleaved per pixel


def dequantise(tokens: torch.Tensor, levels: int, channels: int, size: int) -> torch.Tensor:
    """Raster tokens ``(B, H*W*C)`` -> images in [-1, 1] ``(B, C, H, W)``."""
    x = tokens.float() / (levels - 1) * 2 - 1
    return x.view(tokens.shape[0], size, size, channels).permute(0, 3, 1, 2).contiguous()


class AutoregressiveModule(GenerativeModule):
    """Text-prefixed GPT over quantised pixels. Options: ``temperature``, ``top_k``, ``guidance``."""

    family: ClassVar[str] = "autoregressive"
    latent_kinds: ClassVar[tuple[str, ...]] = ("vq",)
    generate_options: ClassVar[dict[str, type]] = {"temperature": float, "top_k": int, "guidance": float}
    # Inpainting over tokens (see the module docstring); no image-to-image, no interpolation.
    edit_modes: ClassVar[frozenset[str]] = frozenset({"inpaint"})

    # LoRA: the transformer's attention and MLP projections and its caption-prefix projection, and the
    # text encoder's token embedding (a new word's row can move; its blocks are PyTorch's fused
    # TransformerEncoderLayer, whose inference path would skip adapters: see models/lora.py).
    lora_targets = {
        "gpt": ("qkv", "proj", "fc", "prefix_proj"),
        "text_encoder": ("token",),
    }

    def build_nets(self, spec: ModuleSpec) -> None:
        if spec.latent is None and not 1 <= spec.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"data.image_size={spec.image_size}: the autoregressive family supports images up to "
                f"{MAX_IMAGE_SIZE}x{MAX_IMAGE_SIZE} (one token per pixel and channel)"
            )
        c = spec.model
        # The image-token vocabulary: pixel levels, or the VQ autoencoder's codebook.
        self.levels = int(spec.latent["codebook_size"]) if spec.latent is not None else c.levels
        self.num_tokens = math.prod(spec.sample_shape)  # N: H*W*C pixels, or h*w codes
        self.prefix_len = c.text.max_tokens  # P
        self.start_id = self.levels  # input vocabulary: levels + the start token
        self.gpt = GPT(
            GPTConfig(
                vocab_size=self.levels + 1,
                out_size=self.levels,
                block_size=self.prefix_len + self.num_tokens,
                n_layer=c.layers,
                n_head=c.heads,
                n_embd=c.dim,
                dropout=c.dropout,
                prefix_dim=c.text.dim,
            )
        )

    # ---------------------------------------------------------------------------------- training
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """A batch's image tokens ``(B, N)``: quantised pixels, or a latent dataset's VQ codes as stored."""
        if self.latent is not None:
            if tuple(images.shape[1:]) != self.sample_shape:
                raise ValueError(
                    f"batch['image'] has shape {tuple(images.shape)}; the model expects VQ codes "
                    f"(B, *{self.sample_shape}) (latents of a dataset encoded with another autoencoder?)"
                )
            return images.reshape(images.shape[0], -1).long()
        return quantise(images, self.levels)

    def image_logits(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits ``(B, N, levels)`` and the target tokens ``(B, N)``."""
        target = self.tokens(images).to(self.device)  # (B, N)
        text, mask, _ = self.encode_text(captions)  # (B, P, D), (B, P)
        start = torch.full((target.shape[0], 1), self.start_id, dtype=torch.long, device=self.device)
        inp = torch.cat([start, target[:, :-1]], dim=1)  # (B, N)
        logits, _ = self.gpt(inp, prefix=text, prefix_mask=mask)  # (B, P + N, levels)
        return logits[:, self.prefix_len :], target

    def loss(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Mean cross-entropy in nats per image token."""
        logits, target = self.image_logits(images, captions)
        return F.cross_entropy(logits.reshape(-1, self.levels).float(), target.reshape(-1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # Condition dropout from the global RNG, which pl.seed_everything seeds.
        loss = self.loss(batch["image"], drop_captions(batch["caption"], self.model_cfg.cond_drop_prob))
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/bits_per_dim", loss / math.log(2), batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """``val/loss`` (nats per image token) and ``val/bits_per_dim`` over the valid rows.

        Padding repeats (``batch["valid"] == False``) are left out, so each val image counts once.
        Every image has the same N tokens, so the token mean over the kept rows is their row mean.
        """
        x, captions = valid_rows(batch)
        if not captions:
            return None
        loss = self.loss(x, captions)
        b = len(captions)
        self.log("val/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        self.log("val/bits_per_dim", loss / math.log(2), batch_size=b, sync_dist=True)
        return loss

    # -------------------------------------------------------------------------------- sampling
    def _generate(
        self,
        captions: list[str],
        generator: torch.Generator,
        edit: EditRequest | None = None,
        **options: Any,
    ) -> torch.Tensor:
        c = self.model_cfg
        temperature = float(options.get("temperature", c.temperature))
        top_k = options.get("top_k", c.top_k)
        guidance = float(options.get("guidance", c.guidance))
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        known = None
        if edit is not None:
            if edit.masks is None:  # generate() refuses it already (edit_modes); a direct call too
                self._require_edit_mode("img2img", "init_images without masks")
            if edit.strength != 1.0:
                raise ValueError(
                    f"family {self.family!r} inpaints by forcing the kept tokens while sampling: "
                    f"strength has no meaning there, leave it unset (1.0), got {edit.strength!r}"
                )
            known = self._edit_tokens(edit)
        chunks = []
        for i in range(0, len(captions), SAMPLE_CHUNK):
            part = None if known is None else (known[0][i : i + SAMPLE_CHUNK], known[1][i : i + SAMPLE_CHUNK])
            chunks.append(
                self._sample_tokens(
                    captions[i : i + SAMPLE_CHUNK], generator, temperature, top_k, guidance, part
                )
            )
        tokens = torch.cat(chunks)  # (N_images, H*W*C) pixels or (N_images, h*w) codes
        if self.latent is not None:
            return self.decode_latents(tokens.view(-1, *self.sample_shape))
        return dequantise(tokens, self.levels, self.channels, self.image_size)

    def _edit_tokens(self, edit: EditRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """An inpainting request as tokens: the input's tokens ``(n, N)`` long and the positions to
        keep ``(n, N)`` bool, both in the sequence's order.

        Pixel tokens: :func:`quantise` (the training quantisation) of the input, and the mask with
        each pixel's value repeated for its channels in the same interleaved raster order. VQ codes:
        the carried autoencoder's codes of the input, and the mask max-pooled to the code grid, so
        a code cell that sees any masked pixel is regenerated.
        """
        assert edit.masks is not None
        n = edit.images.shape[0]
        if self.latent is not None:
            codes = self.autoencoder.tokens(edit.images)  # (n, h, w)
            regen = pool_mask(edit.masks, self.sample_shape)  # (n, 1, h, w)
            return codes.reshape(n, -1).long(), ~regen.reshape(n, -1)
        tokens = quantise(edit.images, self.levels)  # (n, H*W*C)
        regen = edit.masks.expand(n, self.channels, self.image_size, self.image_size)
        return tokens, ~regen.permute(0, 2, 3, 1).reshape(n, -1)  # as quantise orders the tokens

    def _sample_tokens(
        self,
        captions: list[str],
        g: torch.Generator,
        temperature: float,
        top_k: int | None,
        guidance: float,
        known: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Decode ``len(captions)`` token sequences one token at a time through the KV cache.

        ``known``: inpainting's ``(tokens, keep)``, each ``(B, N)`` (see :meth:`_edit_tokens`). At a
        kept position the drawn token is replaced by the input's, which is what the cache is fed;
        decoding stops after the last position any row regenerates (the rest is the input's).
        """
        b = len(captions)
        end = self.num_tokens
        if known is not None:
            regen = (~known[1]).any(0).nonzero()  # positions some row regenerates
            end = int(regen[-1]) + 1 if len(regen) else 0
        out = torch.empty(b, self.num_tokens, dtype=torch.long, device=self.device)
        if known is not None:
            out.copy_(known[0])
        if end == 0:  # nothing to regenerate: the input's tokens
            return out
        use_cfg = guidance != 1.0
        # With guidance the batch is [conditional; unconditional], sharing one cache.
        text, mask, _ = self.encode_text(captions + [""] * b if use_cfg else captions)
        start = torch.full((text.shape[0], 1), self.start_id, dtype=torch.long, device=self.device)
        logits, cache = self.gpt(start, prefix=text, prefix_mask=mask)
        for i in range(end):
            step = logits[:, -1].float()  # (B or 2B, levels)
            if use_cfg:
                cond, uncond = step[:b], step[b:]
                step = uncond + guidance * (cond - uncond)
            step = step / temperature
            if top_k is not None and int(top_k) < self.levels:
                kth = torch.topk(step, int(top_k), dim=-1).values[:, -1:]  # (B, 1)
                step = step.masked_fill(step < kth, float("-inf"))
            probs = F.softmax(step, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=g)  # (B, 1)
            if known is not None:  # drawn as text-to-image draws it, then forced where kept
                nxt = torch.where(known[1][:, i : i + 1], known[0][:, i : i + 1], nxt)
            out[:, i] = nxt[:, 0]
            if i + 1 < end:
                feed = torch.cat([nxt, nxt]) if use_cfg else nxt
                logits, cache = self.gpt(feed, cache=cache)
        return out
