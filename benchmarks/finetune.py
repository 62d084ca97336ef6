"""Fine-tuning figures (``aigc train --init-from``, ``model.lora``), in one process on one thread.

A base model (``models/diffusion.yaml`` as shipped) learns the 8x8 digits; a second dataset holds
the same digits mirrored left to right, captioned "a mirrored <number>" ("mirrored" is a word the
base never saw). On it, for the same steps, the script trains:

- ``scratch``: the config from random weights;
- ``full``: every weight, started from the base (what ``--init-from`` does);
- ``lora``: LoRA adapters of rank ``--rank`` on the base (``model.lora``), the base frozen.

For each: trainable parameters, the Lightning checkpoint's bytes (what a run writes every
``checkpoint_every_steps``), steady seconds per step, the validation loss on the mirrored digits'
held-out split (fixed noise and timesteps), and the reference evaluator's FD and CLIP score of the
samples. Then the load time of what serving loads: the full fine-tune's export alone, and the
adapter's export onto its base's (``load_export(adapter, base=...)``), each the median of 5.

Training runs through ``aigc.training.trainer.build_trainer`` on the shard DataModule, the same
Trainer settings as ``aigc train`` (without Ray: the figures are the models', not the launcher's).
Prints one JSON object.

    .venv/bin/python benchmarks/finetune.py                  # ~6 minutes on 2 cores
    .venv/bin/python benchmarks/finetune.py --steps 200 --rank 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from common import ROOT, digits_dataset


def mirrored_digits(work: Path) -> Path:
    """The digits flipped left to right as an image folder with captions, built into shards."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from aigc.config import DataConfig
    from aigc.data import build_dataset
    from aigc.data.captions import NUMBER_WORDS

    images = work / "mirrored-images"
    images.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rows = ["file,caption"]
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = np.round(image[:, ::-1] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(images / f"{i:05d}.png")
        rows.append(f"{i:05d}.png,a mirrored {NUMBER_WORDS[int(label)]}")
    (images / "captions.csv").write_text("\n".join(rows) + "\n")
    out = work / "mirrored"
    build_dataset(DataConfig(name="mirrored", source="folder", source_path=str(images)), out)
    return out


class StepClock:
    """Seconds per optimiser step after the first ``skip`` (Lightning's and the loader's warm-up)."""

    def __init__(self, skip: int = 5) -> None:
        import pytorch_lightning as pl

        clock = self

        class _CB(pl.Callback):
            def on_train_batch_end(self, trainer, *args: Any) -> None:
                clock.times.append(time.perf_counter())

        self.callback, self.times, self.skip = _CB(), [], skip

    def seconds_per_step(self) -> float:
        t = self.times[self.skip :]
        return (t[-1] - t[0]) / max(1, len(t) - 1)


def train(module: Any, cfg: Any, data: Path, steps: int, work: Path) -> dict[str, Any]:
    """Fit ``module`` for ``steps`` on ``data``; its checkpoint's bytes and the steady s/step."""
    import pytorch_lightning as pl

    from aigc.data.loader import ShardDataModule
    from aigc.training.trainer import build_trainer

    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    clock = StepClock()
    trainer = build_trainer(
        module,
        cfg.trainer,
        callbacks=[clock.callback],
        max_steps=steps,
        limit_val_batches=0,
        default_root_dir=str(work),
    )
    trainer.fit(module, datamodule=ShardDataModule(cfg.data, location=data, seed=cfg.trainer.seed))
    ckpt = work / "checkpoint.ckpt"
    trainer.save_checkpoint(ckpt)
    return {
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "checkpoint_bytes": ckpt.stat().st_size,
        "seconds_per_step": round(clock.seconds_per_step(), 4),
    }


def val_loss(module: Any, data: Path, n: int = 180) -> float:
    """The live model's mean loss on ``n`` held-out samples, fixed noise and timesteps."""
    import torch

    from aigc.evaluation.data import read_split

    split = read_split(data, "val", max_images=n)
    x0 = split.images.float() / 127.5 - 1.0  # uint8 -> [-1, 1], as the loader gives them
    module.eval()
    with torch.no_grad():
        return float(module.loss(x0, split.captions, generator=torch.Generator().manual_seed(0)).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-steps", type=int, default=400, help="steps of the base on the digits")
    parser.add_argument("--steps", type=int, default=100, help="steps of each run on the mirrored digits")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="LoRA's learning rate")
    parser.add_argument("--samples", type=int, default=500, help="samples per evaluation")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from aigc.config import load_config
    from aigc.data.captions_io import read_captions
    from aigc.evaluation import evaluate_model, reference_evaluator
    from aigc.models import build_module
    from aigc.models.export import export_model, load_export
    from aigc.models.init import load_init, read_tokenizer
    from aigc.models.text import Tokenizer

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    config = ROOT / "models" / "diffusion.yaml"
    with tempfile.TemporaryDirectory(prefix="aigc-finetune-") as tmp:
        work = Path(tmp)
        digits, mirrored = digits_dataset(work), mirrored_digits(work)
        evaluator = reference_evaluator(mirrored, cache_dir=work / "evaluators", progress=say)

        say(f"base: {args.base_steps} steps on the digits")
        base_cfg = load_config(config, [f"trainer.max_steps={args.base_steps}"])
        base = build_module(base_cfg, Tokenizer.build(read_captions(digits, "train")), 8, 1)
        base_figures = train(base, base_cfg, digits, args.base_steps, work / "base")
        base_export = export_model(base, work / "base-export")

        tokenizer = read_tokenizer(base_export).extend(read_captions(mirrored, "train"))
        runs: dict[str, dict[str, Any]] = {}
        for name, extra, start in (
            ("scratch", [], None),
            ("full", [], base_export),
            ("lora", [f"model.lora={{rank: {args.rank}}}", f"trainer.lr={args.lora_lr}"], base_export),
        ):
            say(f"{name}: {args.steps} steps on the mirrored digits")
            cfg = load_config(config, [f"trainer.max_steps={args.steps}", *extra])
            tok = tokenizer if start else Tokenizer.build(read_captions(mirrored, "train"))
            torch.manual_seed(cfg.trainer.seed)
            module = build_module(cfg, tok, 8, 1)
            if start:
                load_init(module, start)
            record = train(module, cfg, mirrored, args.steps, work / name)
            record["val_loss"] = round(val_loss(module, mirrored), 4)
            result = evaluate_model(module.eval(), evaluator, mirrored, num_samples=args.samples, seed=0)
            record |= {k: round(result[k], 3) for k in ("eval/fd", "eval/clip_score")}
            record["module"] = module
            runs[name] = record

        say("load times")
        full_export = export_model(runs["full"].pop("module"), work / "full-export")
        base_ref = {"model": "aigc-diffusion", "version": "1"}
        adapter_export = export_model(runs["lora"].pop("module"), work / "lora-export", base=base_ref)
        runs["scratch"].pop("module")

        def median_load(fn) -> float:
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return round(statistics.median(times), 4)

        load = {
            "full_export_s": median_load(lambda: load_export(full_export)),
            "adapter_onto_base_s": median_load(lambda: load_export(adapter_export, base=base_export)),
        }
        size = {
            "full_export_bytes": (full_export / "weights.safetensors").stat().st_size,
            "adapter_export_bytes": (adapter_export / "weights.safetensors").stat().st_size,
        }
    full, lora, scratch = runs["full"], runs["lora"], runs["scratch"]
    print(
        json.dumps(
            {
                "config": "models/diffusion.yaml",
                "base_steps": args.base_steps,
                "steps": args.steps,
                "rank": args.rank,
                "threads": args.threads,
                "base": base_figures,
                "runs": runs,
                "fine_tuned_over_scratch_val_loss": round(full["val_loss"] / scratch["val_loss"], 3),
                "lora_over_full": {
                    "trainable_params": round(lora["trainable_params"] / full["trainable_params"], 4),
                    "checkpoint_bytes": round(lora["checkpoint_bytes"] / full["checkpoint_bytes"], 4),
                    "seconds_per_step": round(lora["seconds_per_step"] / full["seconds_per_step"], 3),
                    "val_loss": round(lora["val_loss"] / full["val_loss"], 3),
                },
                "exports": size,
                "load": load,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
