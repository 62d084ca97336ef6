"""One emoji quality run: a family's shipped 32 px RGB config, shrunk to a CPU test's
budget, trained on the OpenMoji emoji and measured with the dataset's reference evaluator.

Each :data:`RECIPES` entry names the shipped config and the overrides that make it a few CPU minutes
(narrower nets, fewer steps, smaller batches; the rest, including the losses and the schedule, is the
shipped model), and for a latent model the autoencoder stage before it: train the autoencoder, encode
the emoji with it (``aigc.workflows.encode.encode_dataset``, what ``aigc data encode`` runs), train the
latent model on the codes. Every stage trains with the Trainer of ``aigc train`` in this process, on
one torch thread, with no DataLoader worker process, so two runs share a 2-core machine without
slowing each other's numbers (training is deterministic for a seed on CPU).

The emoji have no labels, so the figures are the label-free ones: the samples come from
:data:`SAMPLES` seeded *train* captions (each emoji's own Unicode name), so the CLIP score asks "does
the image show what its caption says?" of captions the model was given, which is what a CPU budget can
teach; with 1,317 distinct names, naming unseen emoji (the val captions) needs GPU-length training and
is ``benchmarks/latent.py``'s measure. FD compares the samples with the val images (the
train-vs-val floor is the FD of as many real train images). The untrained model is measured the same
way, as the reference a bar must clear.

``python tests/quality/emoji_run.py NAME --dataset DIR --workdir DIR`` prints one run's JSON
(``emoji_run.py evaluator --dataset DIR`` trains the evaluator the runs load);
``AIGC_QUALITY_SEED`` replaces every stage's ``trainer.seed`` (how the bars were calibrated over 3
seeds; ``tests/quality/test_emoji_quality.py`` runs them all, two at a time).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quality_run import quality_config

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = 200  # generated images per measurement (and as many real train images for the floor)

# Settings every stage shares: one process, no loader worker, no validation during training.
COMMON = ("data.num_workers=0",)


@dataclass(frozen=True)
class Stage:
    """A shipped config (``models/<config>.yaml``) with the overrides that fit it to a test."""

    config: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    """What one quality run trains; ``generate`` are the sampling options used for measuring."""

    model: Stage
    autoencoder: Stage | None = None
    generate: dict[str, Any] = field(default_factory=dict)
    samples: int = SAMPLES


RECIPES: dict[str, Recipe] = {
    "vae": Recipe(
        Stage("vae-rgb32", ("model.base_channels=32", "data.batch_size=32", "trainer.max_steps=600"))
    ),
    # Half the width, three levels and one block per level; a higher LR and a short EMA for 200 steps.
    # Sampling is this run's main cost: 100 images with 15 DDIM steps.
    "diffusion": Recipe(
        Stage(
            "diffusion-rgb32",
            (
                "model.base_channels=32",
                "model.channel_mults=[1,2,2]",
                "model.num_res_blocks=1",
                "data.batch_size=32",
                "trainer.lr=0.001",
                "trainer.warmup_steps=50",
                "model.ema_decay=0.99",
                "trainer.max_steps=200",
            ),
        ),
        generate={"steps": 15},
        samples=100,
    ),
    # A quarter of the width, one D update per G update, batch 32, 1200 batches (2400 optimiser
    # steps) at the shipped LR 2e-4. The adversarial game first moves away from the untrained
    # generator's smooth blobs (FD 94 after 200 batches, against 31 untrained) and passes them
    # after about 600 batches; LR 5e-4 was slower past that phase (FD 25 against 17 at 1200).
    "gan": Recipe(
        Stage(
            "gan-rgb32",
            ("model.base_channels=16", "model.d_steps=1", "data.batch_size=32", "trainer.max_steps=2400"),
        )
    ),
    "latent-diffusion": Recipe(
        Stage("latent-diffusion-rgb32", ("model.base_channels=32", "trainer.max_steps=400")),
        autoencoder=Stage("autoencoder-kl32", ("trainer.max_steps=300",)),
        generate={"guidance": 3.0},
    ),
    "latent-autoregressive": Recipe(
        Stage("latent-autoregressive-rgb32", ("trainer.max_steps=400",)),
        autoencoder=Stage("autoencoder-vq32", ("trainer.max_steps=300",)),
    ),
}


def stage_config(stage: Stage, *extra: str):
    """``models/<config>.yaml`` with :data:`COMMON`, the stage's overrides, ``extra``, and
    ``AIGC_QUALITY_SEED`` (``quality_run.quality_config``, which the digits runs use too)."""
    return quality_config(stage.config, *COMMON, *stage.overrides, *extra)


def fit(cfg, location: Path):
    """The module of ``cfg`` for the dataset at ``location``, trained for its ``trainer.max_steps``,
    and the seconds that took."""
    import pytorch_lightning as pl

    from aigc.data.loader import ShardDataModule
    from aigc.models import build_module_for_dataset
    from aigc.training.trainer import build_trainer

    pl.seed_everything(cfg.trainer.seed, verbose=False)
    module = build_module_for_dataset(cfg, str(location))
    trainer = build_trainer(module, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=ShardDataModule(cfg.data, location=location, seed=cfg.trainer.seed))
    assert trainer.global_step >= cfg.trainer.max_steps, (trainer.global_step, cfg.trainer.max_steps)
    return module, time.perf_counter() - start


def train_prompts(dataset: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct train captions in a seeded order."""
    import numpy as np

    from aigc.evaluation.data import read_split

    captions = read_split(dataset, "train").captions
    return [captions[i] for i in np.random.default_rng(seed).choice(len(captions), n, replace=False)]


def measure(module, evaluator, dataset: Path, prompts: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """FD, CLIP score, diversity and copying of one image per prompt (seed 0)."""
    from aigc.evaluation.evaluate import evaluate_images, generate_images

    start = time.perf_counter()
    images = generate_images(module, prompts, seed=0, **options)
    seconds = time.perf_counter() - start
    r = evaluate_images(images, prompts, None, evaluator, dataset_dir=dataset, seed=0)
    keep = ("eval/fd", "eval/fd_train_val", "eval/clip_score", "eval/diversity", "eval/copy_fraction")
    return {k.removeprefix("eval/"): r[k] for k in keep} | {
        "collapse": r["collapse"],
        "copying": r["copying"],
        "sampling_seconds": round(seconds, 1),
    }


def real_clip_score(evaluator, dataset: Path, prompts: list[str]) -> float:
    """The CLIP score of the real train images of ``prompts`` against their own captions, as
    :func:`measure` scores samples: what a model that reproduced them would reach."""
    from aigc.evaluation.data import read_split

    train = read_split(dataset, "train")
    index = {c: i for i, c in enumerate(train.captions)}
    emb = evaluator.image_embeddings(evaluator.features(train.images[[index[p] for p in prompts]]))
    return 100.0 * float((emb * evaluator.text_embeddings(prompts)).sum(1).mean())


def train_evaluator(dataset: Path) -> dict[str, Any]:
    """The dataset's reference evaluator, trained on one thread into ``AIGC_EVALUATOR_CACHE`` (or loaded
    from it), so the runs that follow only load it."""
    from aigc.evaluation import reference_evaluator

    start = time.perf_counter()
    evaluator = reference_evaluator(dataset, threads=1)
    return {"evaluator_hash": evaluator.hash, "seconds": round(time.perf_counter() - start, 1)}


def run(name: str, dataset: Path, workdir: Path) -> dict[str, Any]:
    """Train and measure recipe ``name`` on the image dataset ``dataset``; files go to ``workdir``."""
    import pytorch_lightning as pl
    import torch

    from aigc.evaluation import evaluate_model, reference_evaluator
    from aigc.models import build_module_for_dataset

    torch.set_num_threads(1)
    recipe = RECIPES[name]
    evaluator = reference_evaluator(dataset)  # trained by the caller: loaded from AIGC_EVALUATOR_CACHE
    prompts = train_prompts(dataset, recipe.samples)
    out: dict[str, Any] = {"name": name, "seed": None, "samples": recipe.samples, "generate": recipe.generate}
    location = dataset
    if recipe.autoencoder is not None:
        from aigc.models.export import export_model
        from aigc.workflows.encode import encode_dataset

        ae_cfg = stage_config(recipe.autoencoder)
        ae, seconds = fit(ae_cfg, dataset)
        recon = evaluate_model(ae.eval(), evaluator, dataset, num_samples=SAMPLES, seed=0)
        out["autoencoder"] = {
            "config": recipe.autoencoder.config,
            "steps": ae_cfg.trainer.max_steps,
            "train_seconds": round(seconds, 1),
            "psnr": recon["eval/psnr"],
            "recon_fd": recon["eval/fd"],
        }
        location = workdir / "latents"
        encode_dataset(dataset, str(export_model(ae, workdir / "autoencoder")), location)
    cfg = stage_config(recipe.model, f"data.location={location}")
    out["seed"] = cfg.trainer.seed
    out["steps"] = cfg.trainer.max_steps
    pl.seed_everything(cfg.trainer.seed, verbose=False)
    untrained = build_module_for_dataset(cfg, str(location))
    out["untrained"] = measure(untrained, evaluator, dataset, prompts, recipe.generate)
    module, seconds = fit(cfg, location)
    out["train_seconds"] = round(seconds, 1)
    out["trained"] = measure(module, evaluator, dataset, prompts, recipe.generate)
    out["clip_score_real"] = real_clip_score(evaluator, dataset, prompts)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=[*sorted(RECIPES), "evaluator"], help="a recipe, or 'evaluator'")
    parser.add_argument("--dataset", type=Path, required=True, help="the emoji32 image dataset")
    parser.add_argument("--workdir", type=Path, help="where latents and exports go (a recipe needs it)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.name == "evaluator":
        result = json.dumps(train_evaluator(args.dataset))
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = json.dumps(run(args.name, args.dataset, args.workdir))
    if args.out:
        args.out.write_text(result + "\n", encoding="utf-8")
    print(result)


if __name__ == "__main__":
    main()
