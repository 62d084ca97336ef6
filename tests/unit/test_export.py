"""Exports and checkpoints (aigc.models.export) through the diffusion module: safetensors exports,
Lightning checkpoints loaded with ``weights_only=True``, and a Lightning resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from aigc.data.captions import digit_caption
from aigc.models.diffusion import DiffusionModule
from aigc.models.export import export_model, load_checkpoint, load_export, load_model
from aigc.models.text import Tokenizer
from aigc.training.trainer import build_trainer

CAPTIONS = [digit_caption(i % 10, f"k{i}") for i in range(32)]
MODEL = {
    "family": "diffusion",
    "text": {"dim": 16, "layers": 1, "heads": 2, "max_tokens": 12},
    "base_channels": 8,
    "heads": 2,
    "timesteps": 50,
    "sample_steps": 3,
}
PROMPTS = ["a handwritten digit four", ""]


class Digits(Dataset):
    """Random 8x8 'images' with digit captions, as the shard loader's batches look."""

    def __len__(self) -> int:
        return len(CAPTIONS)

    def __getitem__(self, i: int) -> dict:
        img = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 - 1
        return {"image": img, "caption": CAPTIONS[i], "label": i % 10}


def _module() -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(
        model=MODEL,
        tokenizer=Tokenizer.build(CAPTIONS).to_dict(),
        image_size=8,
        channels=1,
        trainer={"lr": 1e-3, "max_steps": 3, "warmup_steps": 1},
    )


def _trainer(module: DiffusionModule, tmp_path: Path, max_steps: int) -> pl.Trainer:
    return build_trainer(
        module, max_steps=max_steps, limit_val_batches=1, val_check_interval=3, default_root_dir=str(tmp_path)
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[DiffusionModule, Path]:
    """A module trained for 3 steps by Lightning and its checkpoint file."""
    tmp = tmp_path_factory.mktemp("ckpt")
    pl.seed_everything(0, verbose=False)
    m = _module()
    trainer = _trainer(m, tmp, 3)
    loader = DataLoader(Digits(), batch_size=8, shuffle=True)
    trainer.fit(m, loader, DataLoader(Digits(), batch_size=8))
    assert {"train/loss", "val/loss"} <= set(trainer.callback_metrics)
    path = tmp / "last.ckpt"
    trainer.save_checkpoint(path)
    return m.eval(), path


@pytest.mark.timeout(120)
def test_checkpoint_loads_with_weights_only_and_gives_the_same_samples(trained) -> None:
    m, path = trained
    raw = torch.load(path, map_location="cpu", weights_only=True)  # no pickled objects inside
    assert raw["hyper_parameters"]["model"]["family"] == "diffusion"
    loaded = load_checkpoint(path)
    assert isinstance(loaded, DiffusionModule) and not loaded.training
    assert int(loaded.ema_updates) == 3 == int(m.ema_updates)
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert torch.equal(
        m.generate(PROMPTS, num_samples=2, seed=3), loaded.generate(PROMPTS, num_samples=2, seed=3)
    )
    assert torch.equal(load_model(path).generate(PROMPTS, seed=1), m.generate(PROMPTS, seed=1))


@pytest.mark.timeout(120)
def test_lightning_resumes_from_the_checkpoint(trained, tmp_path: Path) -> None:
    _, path = trained
    fresh = _module()
    trainer = _trainer(fresh, tmp_path, 5)
    trainer.fit(fresh, DataLoader(Digits(), batch_size=8, shuffle=True), ckpt_path=str(path))
    assert trainer.global_step == 5
    assert int(fresh.ema_updates) == 5  # the EMA warm-up continues where it stopped


def test_export_round_trip_carries_ema_config_and_tokenizer(trained, tmp_path: Path) -> None:
    m, _ = trained
    out = export_model(m, tmp_path / "export")
    weights = load_file(str(out / "weights.safetensors"))
    assert any(k.startswith("ema_unet.") for k in weights) and "ema_updates" in weights
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "diffusion" and config["image_size"] == 8 and config["channels"] == 1
    assert config["model"]["sample_steps"] == 3
    assert Tokenizer.load(out / "tokenizer.json").vocab == m.tokenizer.vocab
    loaded = load_model(out)
    assert isinstance(loaded, DiffusionModule)
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    for opts in ({}, {"sampler": "ddpm", "guidance": 1.5, "steps": 4}):
        assert torch.equal(
            m.generate(PROMPTS, num_samples=2, seed=7, **opts),
            loaded.generate(PROMPTS, num_samples=2, seed=7, **opts),
        )


def test_bad_exports_and_checkpoints_are_named(trained, tmp_path: Path) -> None:
    m, _ = trained
    out = export_model(m, tmp_path / "export")
    (out / "weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights.safetensors is missing"):
        load_export(out)
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, bogus)
    with pytest.raises(ValueError, match="not an aigc checkpoint"):
        load_checkpoint(bogus)


@pytest.mark.parametrize("family", ["diffusion", "gan", "vae", "autoregressive", "autoencoder"])
def test_every_family_rebuilds_from_its_plain_json_hyperparameters(family: str) -> None:
    """What load_checkpoint relies on: ``cls(**hyper_parameters)`` after a JSON round trip gives the
    same module, and the keys are the shared constructor's (no family adds or renames one)."""
    from aigc.config import load_config
    from aigc.models import build_module, module_class

    cfg = load_config(Path(__file__).parents[2] / "models" / f"{family}.yaml")
    m = build_module(cfg, Tokenizer.build(CAPTIONS), cfg.data.image_size, cfg.data.channels)
    hp = json.loads(json.dumps(dict(m.hparams)))  # fails on anything not plain JSON
    assert set(hp) == {"model", "tokenizer", "image_size", "channels", "trainer", "latent"}
    assert hp["model"] == cfg.model.model_dump(mode="json")  # resolved, family included
    rebuilt = module_class(family)(**hp)
    rebuilt.load_state_dict(m.state_dict())  # strict: the same nets under the same names
    assert rebuilt.model_cfg == m.model_cfg and rebuilt.trainer_cfg == m.trainer_cfg
    assert (rebuilt.image_size, rebuilt.channels, rebuilt.latent) == (m.image_size, m.channels, None)
