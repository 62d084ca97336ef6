"""A tiny Stable-Diffusion-format pipeline folder with random weights, built offline, for the tests of
the ``sd`` family (aigc.models.sd) and anything else that needs a diffusers pipeline.

As diffusers' own fast tests do: each part is made from a small config and written with
``save_pretrained``. The CLIP tokenizer's vocabulary is written here (the 256 byte-level characters,
each also as a word end ``</w>``, the two special tokens and a few merges), so nothing is downloaded.
Importable from every test (pytest puts ``tests/`` on ``sys.path`` for ``tests/conftest.py``)::

    from sd_pipeline import build_tiny_pipeline
    folder = build_tiny_pipeline(tmp_path / "pipe", prediction_type="v_prediction")

The folder has the layout of a Stable Diffusion 1.x/2.x checkpoint: ``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; ``StableDiffusionPipeline.from_pretrained``
loads it.
"""

from __future__ import annotations

from pathlib import Path

#: the image size the tiny pipeline is meant for: 16 px RGB -> 8x8x4 latents (the VAE halves once)
IMAGE_SIZE = 16
#: the tokenizer's context length (Stable Diffusion's is 77; shorter keeps the tests fast)
MAX_TOKENS = 16
#: merges of the tiny BPE vocabulary: a few so that common words become fewer tokens
_MERGES = ["r e", "re d</w>", "b l", "bl u", "blu e</w>", "g r", "gr e", "gre e", "gree n</w>", "s q"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def tiny_tokenizer(max_tokens: int = MAX_TOKENS):
    """A CLIPTokenizer over a vocabulary made here (no download)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    for merge in _MERGES:
        tokens.append(merge.replace(" ", ""))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    merges = [tuple(m.split(" ")) for m in _MERGES]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_tokens)


def build_tiny_pipeline(
    out: str | Path,
    prediction_type: str = "epsilon",
    scheduler: str = "DDIMScheduler",
    seed: int = 0,
) -> Path:
    """Write a tiny random-weight SD pipeline folder at ``out``; returns it.

    ``prediction_type``: the scheduler config's ``epsilon`` or ``v_prediction`` (what the UNet
    predicts, hence the family's training target). ``scheduler``: a diffusers scheduler class name
    (``DDIMScheduler``, ``DDPMScheduler``, ``EulerDiscreteScheduler``, ``PNDMScheduler``...).
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    sched_kwargs = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,  # as Stable Diffusion 1.x's own config (diffusers warns about 0)
    )
    if scheduler in ("DDIMScheduler", "DDPMScheduler"):
        sched_kwargs["clip_sample"] = False
    if scheduler in ("DDIMScheduler", "PNDMScheduler"):
        sched_kwargs["set_alpha_to_one"] = False
    sched = getattr(diffusers, scheduler)(**sched_kwargs)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def folder_bytes(folder: str | Path, suffix: str = ".safetensors") -> int:
    """Total size of the weight files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob(f"*{suffix}"))
