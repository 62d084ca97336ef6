"""bf16 mixed precision on CUDA, for every family (skipped without a GPU; CI has none).

``trainer.precision: bf16-mixed`` is a config switch that works on GPU and is
ignored cleanly on CPU. The CPU half is tested in ``tests/unit/test_precision.py``; this file is the
GPU half. Each family trains from its shipped ``models/<family>.yaml`` with a plain Lightning Trainer
on one GPU under ``precision="bf16-mixed"`` and must:

- really compute in bf16 (a forward hook sees bf16 outputs of its conv/linear layers) while its
  parameters and optimiser stay float32 (autocast, not a bf16 cast of the weights);
- keep every logged loss finite and lower the loss (for the GAN: the discriminator's loss; its
  generator's loss is a game value, not a thing that falls);
- generate on the GPU: uint8 ``(N, C, H, W)`` on the CPU, the same for the same seed.

Run it on a CUDA machine with ``python -m pytest tests/gpu -q``; the learning figures at scale come
from ``benchmarks/quality.py --precision bf16-mixed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tiny import SCRATCH_FAMILIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 300
LOSS_KEY = {
    "diffusion": "train/loss",
    "gan": "train/loss_d",
    "vae": "train/loss",
    "autoregressive": "train/loss",
    "autoencoder": "train/loss",
}


class _Record:
    """Loss per step and the dtypes that conv/linear layers produced, gathered while training."""

    def __init__(self, key: str) -> None:
        import pytorch_lightning as pl

        record = self

        class Callback(pl.Callback):
            def on_train_batch_end(self, trainer, *args: Any) -> None:
                value = trainer.callback_metrics.get(key)
                if value is not None:
                    record.losses.append(float(value))

        self.key = key
        self.losses: list[float] = []
        self.output_dtypes: set[torch.dtype] = set()
        self.callback = Callback()

    def hook(self, module: torch.nn.Module) -> None:
        def record_dtype(_mod, _inp, out) -> None:
            if isinstance(out, torch.Tensor):
                self.output_dtypes.add(out.dtype)

        for sub in module.modules():
            if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                sub.register_forward_hook(record_dtype)


@pytest.mark.parametrize("family", SCRATCH_FAMILIES)
@pytest.mark.timeout(300)
def test_bf16_mixed_trains_and_generates_on_gpu(family: str, digits_dataset: Path) -> None:
    import pytorch_lightning as pl

    from aigc import project_root
    from aigc.config import load_config
    from aigc.data.captions_io import read_captions
    from aigc.data.loader import ShardDataModule
    from aigc.models import build_module
    from aigc.models.text import Tokenizer
    from aigc.training.trainer import build_trainer

    cfg = load_config(
        project_root() / "models" / f"{family}.yaml",
        overrides=[f"trainer.max_steps={STEPS}", "trainer.precision=bf16-mixed"],
    )
    pl.seed_everything(cfg.trainer.seed, verbose=False)
    tokenizer = Tokenizer.build(read_captions(digits_dataset, "train"))
    module = build_module(cfg, tokenizer, cfg.data.image_size, cfg.data.channels)
    record = _Record(LOSS_KEY[family])
    record.hook(module)
    # aigc train's Trainer (precision through lightning_precision), on the GPU, no validation.
    trainer = build_trainer(module, use_gpu=True, callbacks=[record.callback], limit_val_batches=0)
    trainer.fit(module, datamodule=ShardDataModule(cfg.data, location=digits_dataset, seed=0))

    assert trainer.global_step == STEPS
    assert torch.bfloat16 in record.output_dtypes, f"no bf16 compute seen: {record.output_dtypes}"
    assert all(p.dtype == torch.float32 for p in module.parameters()), "weights must stay float32"
    assert all(torch.isfinite(torch.tensor(record.losses))), "a loss went non-finite under bf16"
    window = max(5, len(record.losses) // 10)
    first = sum(record.losses[:window]) / window
    last = sum(record.losses[-window:]) / window
    assert last < first, f"{record.key} did not fall under bf16: {first:.4f} -> {last:.4f}"

    module.to("cuda")
    prompts = ["a handwritten digit three", "the digit 7"]
    images = module.generate(prompts, num_samples=3, seed=5)
    size, channels = cfg.data.image_size, cfg.data.channels
    assert images.dtype == torch.uint8 and images.device.type == "cpu"
    assert images.shape == (6, channels, size, size)
    assert torch.equal(images, module.generate(prompts, num_samples=3, seed=5))
    assert int(images.max()) > int(images.min()), "generated images are flat"
