"""The bare-stack floor of ``cold_start.py``: the smallest Ray Train V2 + Lightning job, no aigc.

One ``TorchTrainer`` worker runs a Lightning ``Trainer`` with ``RayDDPStrategy``,
``RayLightningEnvironment`` and ``prepare_trainer`` (Ray's documented Lightning recipe) on a small
conv net fed from tensors in memory, and writes the wall-clock time of its first optimiser step to
``--out``. What a user who glues Ray and Lightning by hand pays before training starts: Python and
library imports, Ray start, the controller and worker actors, the process group, the first step.

Ray is started the way ``aigc train`` starts its embedded instance (loopback, no dashboard, see
``aigc.cluster``), so the two differ only by what aigc adds.

    .venv/bin/python benchmarks/bare_stack.py --out /tmp/first-step.json [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import pytorch_lightning as pl
import ray
import ray.train
import torch
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer
from ray.train.torch import TorchTrainer
from torch import nn


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 1, 3, padding=1))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return nn.functional.mse_loss(self.net(x), x)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


IMPORTED_AT = time.time()


class FirstStep(pl.Callback):
    def __init__(self, out: str, times: dict[str, float]):
        self.out, self.times = out, times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1 and trainer.global_rank == 0:
            with open(self.out, "w") as f:
                json.dump(self.times | {"first_step_at": time.time()}, f)


def loop(config: dict) -> None:
    times = config["times"] | {"worker_at": time.time()}
    torch.set_num_threads(config["threads"])
    data = torch.utils.data.TensorDataset(torch.randn(256, 1, 8, 8))
    trainer = pl.Trainer(
        max_steps=config["steps"],
        devices="auto",
        accelerator="cpu",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=[FirstStep(config["out"], times)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = prepare_trainer(trainer)
    trainer.fit(Net(), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=config["batch"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--storage", default="/tmp/aigc-bare-stack")
    p.add_argument("--address", default=None, help="join this Ray instance instead of starting one")
    a = p.parse_args()
    times = {"imported_at": IMPORTED_AT}
    if a.address:
        ray.init(address=a.address, log_to_driver=False)
    else:
        from common import start_embedded_ray

        start_embedded_ray()
    trainer = TorchTrainer(
        loop,
        train_loop_config={
            "threads": a.threads,
            "steps": a.steps,
            "batch": a.batch,
            "out": a.out,
            "times": times | {"ray_at": time.time()},
        },
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": a.threads}),
        run_config=ray.train.RunConfig(storage_path=a.storage),
    )
    trainer.fit()


if __name__ == "__main__":
    main()
