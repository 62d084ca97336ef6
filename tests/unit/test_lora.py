"""LoRA adapters on aigc's own families (``model.lora``, ``aigc.models.lora``), below Ray: the adapted
model is its base at step 0, only the adapters train and the base stays bit-identical, a checkpoint
is the adapter (a few percent of the full model's), resuming reproduces the uninterrupted run, and
an export holds the adapter and names its base, onto which it loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from aigc.config import ConfigError
from aigc.data.captions import digit_caption
from aigc.models.diffusion import DiffusionModule
from aigc.models.export import export_model, load_checkpoint, load_export
from aigc.models.init import load_init, read_weights
from aigc.models.lora import base_key, is_adapter_key
from aigc.models.text import Tokenizer
from aigc.training.callbacks import RngState
from aigc.training.trainer import build_trainer

CAPTIONS = [digit_caption(i % 10, f"k{i}") for i in range(32)]
MODEL = {
    "family": "diffusion",
    "text": {"dim": 16, "layers": 1, "heads": 2, "max_tokens": 12},
    "base_channels": 16,
    "heads": 2,
    "timesteps": 50,
    "sample_steps": 3,
}
LORA = {"rank": 2}
PROMPTS = ["a handwritten digit four", ""]
BASE = {"model": "aigc-diffusion", "version": "1"}


class Digits(Dataset):
    """scikit-learn's 8x8 digits with their captions, as the shard loader's batches look."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        self.images = torch.tensor(d.images[: len(CAPTIONS)], dtype=torch.float32) / 8.0 - 1.0

    def __len__(self) -> int:
        return len(CAPTIONS)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i][None], "caption": CAPTIONS[i], "label": i % 10}


def module(lora: dict | None = None, seed: int = 0) -> DiffusionModule:
    torch.manual_seed(seed)
    return DiffusionModule(
        model=MODEL | ({"lora": lora} if lora else {}),
        tokenizer=Tokenizer.build(CAPTIONS).to_dict(),
        image_size=8,
        channels=1,
        trainer={"lr": 3e-2, "max_steps": 16, "lr_schedule": "constant"},
    )


def fit(m: DiffusionModule, root: Path, steps: int, ckpt: Path | None = None) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = build_trainer(
        m, max_steps=steps, limit_val_batches=0, default_root_dir=str(root), callbacks=[RngState()]
    )
    # One batch per epoch: a resume starts a new epoch, as the uninterrupted run does at that step
    # (a plain DataLoader cannot resume mid-epoch; aigc's shard loader can: ShardDataModule.resume_at).
    trainer.fit(m, DataLoader(Digits(), batch_size=len(CAPTIONS)), ckpt_path=str(ckpt) if ckpt else None)
    return trainer


def batch_loss(m: DiffusionModule) -> float:
    """The live model's mean loss on the first 16 digits, for fixed noise and timesteps."""
    images = Digits().images[:16, None]
    with torch.no_grad():
        return float(m.loss(images, CAPTIONS[:16], generator=torch.Generator().manual_seed(3)).mean())


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A base model's export: the diffusion model trained fully for 8 steps."""
    root = tmp_path_factory.mktemp("base")
    m = module()
    fit(m, root, 8)
    trainer_ckpt = root / "full.ckpt"
    m.trainer.save_checkpoint(trainer_ckpt)
    return export_model(m, root / "export")


def lora_on(base: Path, seed: int = 1) -> DiffusionModule:
    m = module(LORA, seed=seed)
    load_init(m, base)
    return m


def test_the_adapted_model_is_its_base_at_step_0_and_only_its_adapters_train(base: Path, tmp_path: Path):
    source = load_export(base)
    m = lora_on(base)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_key(n) and not n.startswith("ema_") for n in trainable)
    assert sum(p.numel() for n, p in m.named_parameters() if n in trainable) < 0.05 * sum(
        p.numel() for p in source.unet.parameters()
    )
    assert torch.equal(source.generate(PROMPTS, 2, seed=5), m.generate(PROMPTS, 2, seed=5))

    before = batch_loss(m)
    fit(m, tmp_path, 16)
    after = batch_loss(m)
    # The adapters learn the digits further (measured: 0.694 -> 0.665; deterministic on the CPU: a
    # diffusion loss has a floor, the noise it cannot predict). Frozen or untrained adapters: equal.
    assert after < 0.97 * before, (before, after)
    weights = read_weights(base)
    for key, value in m.state_dict().items():
        if key in m.base_weight_keys():
            assert torch.equal(value, weights[base_key(key)]), key  # the base: bit-identical
    assert any(
        float(v.abs().sum()) > 0 for k, v in m.state_dict().items() if "lora_B" in k and "ema_" not in k
    )
    assert not torch.equal(source.generate(PROMPTS, 2, seed=5), m.generate(PROMPTS, 2, seed=5))


def test_a_lora_checkpoint_is_the_adapter_and_resuming_reproduces_the_run(base: Path, tmp_path: Path):
    straight = lora_on(base)
    fit(straight, tmp_path / "straight", 8)

    first = lora_on(base)
    fit(first, tmp_path / "first", 4)
    ckpt = tmp_path / "half.ckpt"
    first.trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k in saved for k in first.base_weight_keys())
    assert {k for k in saved if is_adapter_key(k)} == {k for k in first.state_dict() if is_adapter_key(k)}
    full = base.parent / "full.ckpt"  # the same model fine-tuned fully: weights and Adam's moments
    assert ckpt.stat().st_size < 0.10 * full.stat().st_size, (ckpt.stat().st_size, full.stat().st_size)

    resumed = lora_on(base, seed=7)  # other fresh adapters: the checkpoint replaces them
    fit(resumed, tmp_path / "resumed", 8, ckpt=ckpt)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key

    # A LoRA checkpoint loads onto its base: by default <run>/init-from beside its folder.
    with pytest.raises(FileNotFoundError, match="LoRA checkpoint, and its base model"):
        load_checkpoint(ckpt)
    loaded = load_checkpoint(ckpt, base=base)
    assert torch.equal(loaded.generate(PROMPTS, 1, seed=2), first.eval().generate(PROMPTS, 1, seed=2))


def test_an_export_holds_the_adapter_names_its_base_and_loads_onto_it(base: Path, tmp_path: Path):
    m = lora_on(base)
    fit(m, tmp_path, 4)
    with pytest.raises(ValueError, match="must name its base model"):
        export_model(m, tmp_path / "nameless")
    out = export_model(m, tmp_path / "adapter", base=BASE)
    weights = load_file(str(out / "weights.safetensors"))
    assert not any(k in m.base_weight_keys() for k in weights)
    assert json.loads((out / "config.json").read_text())["base"] == BASE
    assert (out / "weights.safetensors").stat().st_size < 0.10 * (base / "weights.safetensors").stat().st_size
    with pytest.raises(ValueError, match="is a LoRA adapter on"):
        load_export(out)
    loaded = load_export(out, base=base)
    assert torch.equal(loaded.generate(PROMPTS, 2, seed=4), m.eval().generate(PROMPTS, 2, seed=4))


def test_autoregressive_takes_adapters_and_unknown_targets_are_named():
    from aigc.config import load_config
    from aigc.models import build_module

    tok = Tokenizer.build(CAPTIONS)
    cfg = load_config(
        None,
        [
            "model.family=autoregressive",
            "model.dim=32",
            "model.layers=1",
            "model.heads=2",
            "model.text.dim=16",
            "model.text.heads=2",
            "model.lora={rank: 2}",
        ],
    )
    m = build_module(cfg, tok, 8, 1)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_key(n) for n in trainable)
    assert any(n.startswith("gpt.") for n in trainable) and any(
        n.startswith("text_encoder.") for n in trainable
    )
    with pytest.raises(ConfigError, match="model.lora.targets: \\['nothing'\\] names no layer"):
        module({"rank": 2, "targets": ["nothing"]})
    # The text encoder's blocks are PyTorch's fused TransformerEncoderLayer: its eval path reads
    # linear1/linear2's weights directly, so an adapter there would train and then be skipped.
    with pytest.raises(
        ConfigError, match="text_encoder.blocks.layers.0.linear1 are layers of PyTorch's fused"
    ):
        module({"rank": 2, "targets": ["linear1"]})


def test_merging_folds_the_adapters_into_a_plain_model_that_draws_the_same_images(base: Path, tmp_path: Path):
    from aigc.models.lora import merged_module

    m = lora_on(base)
    fit(m, tmp_path, 4)
    plain = merged_module(m.eval())
    assert plain.hparams["model"]["lora"] is None and not plain.needs_base
    assert not any(is_adapter_key(k) for k in plain.state_dict())
    assert torch.equal(plain.generate(PROMPTS, 2, seed=6), m.generate(PROMPTS, 2, seed=6))
