"""The digits quality runs: train, then evaluate.

Each ``test_<family>_quality.py`` trains its shipped ``models/<family>.yaml`` as it is, for the
config's ``trainer.max_steps`` (calibrated over 3 seeds, see ``models/<family>.md``), with the
Trainer of ``aigc train`` (``aigc.training.trainer.build_trainer``) on one CPU thread, then measures
500 samples generated from the held-out caption template with the digits reference evaluator against
the same model untrained. ``AIGC_QUALITY_SEED`` replaces ``trainer.seed`` (how the calibration reran
them).

A family that edits (``img2img`` in its ``edit_modes``: diffusion, vae) is also measured on image-to-image
(:func:`seven_to_one`): the val split's real sevens edited with the prompt "a handwritten digit one" at
strength 0.6, judged by the reference classifier (the README's "Edit and explore" figure).

``python tests/quality/quality_run.py FAMILY --dataset DIR [--validate] [--set KEY=VALUE]`` runs one
and prints its JSON; the tests run them that way, two at a time (``pool.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def quality_config(family: str, *overrides: str):
    """``models/<family>.yaml`` with ``overrides``, and ``AIGC_QUALITY_SEED`` as ``trainer.seed``."""
    from aigc.config import load_config

    seed = os.environ.get("AIGC_QUALITY_SEED")
    extra = [f"trainer.seed={seed}"] if seed else []
    return load_config(ROOT / "models" / f"{family}.yaml", overrides=[*overrides, *extra])


@dataclass
class QualityRun:
    """What one quality run measured; ``summary`` is printed (``-s``) and shown on failure."""

    module: Any
    result: dict[str, Any]  # evaluate_model() of the trained model
    untrained: dict[str, Any]  # the same for the model before training
    val_loss: float | None = None
    val_loss_untrained: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def train_and_evaluate(cfg, dataset: Path, evaluator, *, validate: bool = False) -> QualityRun:
    """Train ``cfg`` for its ``trainer.max_steps`` and evaluate it on 500 held-out-template samples.

    With ``validate``, also ``val/loss`` of the trained model and of a fresh untrained one (for the
    families whose val/loss is a likelihood bound or a denoising error, not a game value).
    """
    import pytorch_lightning as pl
    import torch

    from aigc.data.captions_io import read_captions
    from aigc.data.loader import ShardDataModule
    from aigc.evaluation import evaluate_model
    from aigc.models import build_module
    from aigc.models.text import Tokenizer
    from aigc.training.trainer import build_trainer

    tokenizer = Tokenizer.build(read_captions(dataset, "train"))
    size, channels = cfg.data.image_size, cfg.data.channels
    pl.seed_everything(cfg.trainer.seed, verbose=False)
    module = build_module(cfg, tokenizer, size, channels)
    untrained = evaluate_model(module, evaluator, dataset, num_samples=500, seed=0)
    data = ShardDataModule(cfg.data, location=dataset, seed=cfg.trainer.seed)
    # aigc train's own Trainer settings, on this process's CPU, with no validation during training
    # (it would consume RNG and change the calibrated runs).
    fit = build_trainer(module, limit_val_batches=0)
    start = time.perf_counter()
    fit.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - start
    assert fit.global_step == cfg.trainer.max_steps
    assert all(torch.isfinite(v).all() for k, v in fit.callback_metrics.items() if k.startswith("train/"))

    run = QualityRun(module, evaluate_model(module, evaluator, dataset, num_samples=500, seed=0), untrained)
    if validate:
        val = build_trainer(module)
        fresh = build_module(cfg, tokenizer, size, channels)
        run.val_loss = val.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
        run.val_loss_untrained = val.validate(fresh, datamodule=data, verbose=False)[0]["val/loss"]
    keys = ("eval/cond_accuracy", "eval/fd", "eval/diversity", "eval/copy_fraction", "sampling_seconds")
    run.summary = {k: run.result[k] for k in keys} | {
        "family": cfg.model.family,
        "seed": cfg.trainer.seed,
        "steps": cfg.trainer.max_steps,
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "untrained_fd": untrained["eval/fd"],
        "val_loss": run.val_loss,
        "val_loss_untrained": run.val_loss_untrained,
    }
    print(json.dumps(run.summary))
    return run


# Image-to-image on the digits: every real "seven" of the val split (19 in the default
# shards) edited EDIT_COPIES times, each copy from its own starting noise, with the training templates'
# wording for "one", at the config's sampling steps and guidance.
EDIT_PROMPT = "a handwritten digit one"  # aigc.data.captions.TRAIN_TEMPLATES[0] for 1
EDIT_STRENGTH = 0.6
EDIT_COPIES = 10
EDIT_SEED = 0


def seven_to_one(
    module, evaluator, dataset: Path, strengths: tuple[float, ...] = (), copies: int = EDIT_COPIES
) -> dict[str, Any]:
    """The digit-editing figures: of the val sevens edited towards "one" at :data:`EDIT_STRENGTH`,
    the share the reference classifier calls 1 (``edit/seven_to_one``) and 7 (``edit/seven_kept``);
    the same shares of the unedited sevens (``edit/input_as_one``, ``edit/input_as_seven``: strength
    0 returns the input, so these are also its figures); ``edit/seven_to_one_by_strength`` for
    ``strengths`` besides 0.6 (calibration), all from the same starting noise (seed
    :data:`EDIT_SEED`)."""
    from aigc.evaluation.data import read_split

    val = read_split(dataset, "val", channels=evaluator.config.channels)
    sevens = val.images[val.labels == 7]  # (S, C, H, W) uint8
    inputs = sevens.repeat_interleave(copies, dim=0)  # (S * copies, C, H, W)
    start = time.perf_counter()
    by_strength = {}
    for strength in sorted({EDIT_STRENGTH, *strengths}):
        out = module.generate(
            [EDIT_PROMPT] * len(inputs), seed=EDIT_SEED, init_images=inputs, strength=strength
        )
        predicted = evaluator.classify(out)
        by_strength[strength] = tuple(float((predicted == d).double().mean()) for d in (1, 7))
    seconds = time.perf_counter() - start
    unedited = evaluator.classify(sevens)
    return {
        "edit/seven_to_one": by_strength[EDIT_STRENGTH][0],
        "edit/seven_kept": by_strength[EDIT_STRENGTH][1],
        "edit/input_as_one": float((unedited == 1).double().mean()),
        "edit/input_as_seven": float((unedited == 7).double().mean()),
        "edit/seven_to_one_by_strength": {str(k): v[0] for k, v in by_strength.items()},
        "edit/sevens": len(sevens),
        "edit/edits": len(inputs),
        "edit/strength": EDIT_STRENGTH,
        "edit/prompt": EDIT_PROMPT,
        "edit/seed": EDIT_SEED,
        "edit_seconds": round(seconds, 2),
    }


def assert_quality(record: dict[str, Any], min_accuracy: float, fd_ratio: float) -> None:
    """The targets every family shares, on a run's JSON (``main``): follows the held-out captions, FD
    far below the untrained model's, neither collapsed nor copying."""
    assert "error" not in record, record.get("error")
    assert record["prompts"] == "heldout", record
    assert record["eval/cond_accuracy"] >= min_accuracy, record
    assert record["eval/fd"] < fd_ratio * record["untrained_fd"], record
    assert not record["collapse"], record
    assert not record["copying"], record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family")
    parser.add_argument("--dataset", type=Path, required=True, help="the digits shards")
    parser.add_argument("--validate", action="store_true", help="also val/loss, trained and untrained")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--edit-strength",
        dest="edit_strengths",
        type=float,
        action="append",
        default=[],
        help="also measure the seven-to-one edit at this strength (besides 0.6)",
    )
    args = parser.parse_args()

    import torch

    from aigc.evaluation import reference_evaluator

    torch.set_num_threads(1)  # the calibrated runs' setting; two runs share a 2-core machine
    cfg = quality_config(args.family, *args.overrides)
    evaluator = reference_evaluator(args.dataset)  # trained by the caller: loaded from the cache
    run = train_and_evaluate(cfg, args.dataset, evaluator, validate=args.validate)
    prompt = ["a drawing of the handwritten number four"]
    record = run.summary | {
        "prompts": run.result["prompts"],
        "collapse": run.result["collapse"],
        "copying": run.result["copying"],
        "max_steps": cfg.trainer.max_steps,
        # What a family's test checks beyond the shared targets.
        "ema_updates": int(getattr(run.module, "ema_updates", -1)),
        "d_steps": getattr(cfg.model, "d_steps", None),
        "repeatable": bool(
            torch.equal(
                run.module.generate(prompt, num_samples=4, seed=1),
                run.module.generate(prompt, num_samples=4, seed=1),
            )
        ),
    }
    if "img2img" in getattr(run.module, "edit_modes", ()):
        record |= seven_to_one(run.module, evaluator, args.dataset, tuple(args.edit_strengths))
    text = json.dumps(record)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
