"""The ``eval/*`` figures of generated images, measured with a dataset's reference evaluator.

Figures (all from one set of generated images and the prompts they were generated from):

- ``eval/fd``: Fréchet distance between evaluator features of the generated images and of the val
  split (see :mod:`aigc.evaluation.metrics` for the method and its small-sample bias).
  ``eval/fd_train_val``: the same for ``num_samples`` train images against val, the floor a model
  that reproduced the training distribution would reach.
- ``eval/clip_score``: 100 x the mean cosine similarity between each prompt's and its image's
  evaluator embedding (torchmetrics' CLIPScore scaling; not clipped at 0 and without the 2.5
  weight of Hessel et al. 2021). ``eval/clip_score_val``: the same for val images and their captions.
- ``eval/cond_accuracy`` (labelled data): share of generated images the evaluator's classifier
  assigns the prompt's label; ``eval/val_accuracy``: the classifier on real val images.
- ``eval/diversity``: within-class diversity of the generated images over that of real val images
  (mean pairwise feature distance inside each label, averaged over labels; over all images when
  there are no labels). ``collapse`` is set below :data:`COLLAPSE_BELOW` = 1/3. Why 1/3: a model
  that draws each image from k equally likely fixed images per class scores 1 - 1/k, so 1/3 means
  fewer than 1.5 distinct images per prompt. Calibration (digits, 500 samples): real images 1.0,
  one image repeated 0.0, one fixed image per class 0.0, uniform noise 1.8; after 90 s of CPU
  training (benchmarks/quality.py --seconds 90) the guided diffusion model (guidance 3) 0.56, the
  GAN 0.82, the VAE 1.26. Classifier-free guidance trades diversity for fidelity, so a ratio near
  0.5 is not by itself collapse.
- ``eval/copy_fraction``: share of generated images whose nearest training image (pixel space) is
  closer than ``copy_distance``: :data:`COPY_DISTANCE_FACTOR` x the :data:`COPY_QUANTILE` quantile
  of the nearest-train distances of real val images; i.e. at least twice as close to a training
  image as all but 1 % of unseen real images are. ``copying`` is set above :data:`COPYING_ABOVE`.

An autoencoder (family ``autoencoder``) is not a text-to-image model: :func:`evaluate_model` measures
it by reconstruction instead (:func:`evaluate_reconstruction`): ``eval/psnr``, ``eval/mse``,
``eval/fd`` between the reconstructions and the images they reconstruct (the "rFID" of Esser et al.
2021 and Rombach et al. 2022, with this evaluator's features) and the same ``eval/fd_train_val``.

Every result carries ``evaluator_hash``, ``data_version``, ``num_samples`` and ``seed``;
:func:`comparable` says whether two results were measured the same way.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aigc.contract import DEFAULT_EVAL_SAMPLES, PROVENANCE
from aigc.data.manifest import read_manifest
from aigc.data.version import version as data_version
from aigc.evaluation.data import read_split
from aigc.evaluation.metrics import (
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    group_diversity,
    nearest_distances,
    pixels,
)
from aigc.evaluation.reference import ReferenceEvaluator

COLLAPSE_BELOW = 1 / 3  # within-class diversity ratio: < 1.5 distinct images per prompt (docstring)
COPY_QUANTILE = 0.01
COPY_DISTANCE_FACTOR = 0.5
COPYING_ABOVE = 0.05  # more than 5 % near-copies of training images: copying
# Caps on the reference sets of large datasets (the first images in shard order): the
# nearest-neighbour search is O(generated x train x pixels).
MAX_REFERENCE_IMAGES = 20_000
MAX_CALIBRATION_IMAGES = 1_000  # val images whose nearest-train distances set copy_distance


def reference_statistics(evaluator: ReferenceEvaluator, dataset_dir: str | Path) -> dict[str, Any]:
    """What generated images are compared with, computed once per evaluator and dataset."""
    key = str(Path(str(dataset_dir)).resolve()) if "://" not in str(dataset_dir) else str(dataset_dir)
    if key in evaluator._reference:
        return evaluator._reference[key]
    version = data_version(dataset_dir)
    if version != evaluator.data_version:
        raise ValueError(
            f"{dataset_dir} has data version {version} but the evaluator was trained on "
            f"{evaluator.data_version}; use reference_evaluator({str(dataset_dir)!r})"
        )
    c = evaluator.config.channels
    train = read_split(dataset_dir, "train", max_images=MAX_REFERENCE_IMAGES, channels=c)
    val = read_split(dataset_dir, "val", max_images=MAX_REFERENCE_IMAGES, channels=c)
    val_features = evaluator.features(val.images)  # (V, F)
    train_pixels = pixels(train.images)  # (T, C*H*W)
    val_nn = nearest_distances(pixels(val.images[:MAX_CALIBRATION_IMAGES]), train_pixels)  # (V,)
    val_emb = evaluator.image_embeddings(val_features)
    ref = {
        "train": train,
        "val": val,
        "train_pixels": train_pixels,
        "val_stats": gaussian_stats(val_features),
        "val_features": val_features,
        "copy_distance": COPY_DISTANCE_FACTOR * float(torch.quantile(val_nn, COPY_QUANTILE)),
        "diversity_real": group_diversity(val_features, val.labels),
        "clip_score_val": 100.0 * float((val_emb * evaluator.text_embeddings(val.captions)).sum(1).mean()),
    }
    if evaluator.has_classifier and val.labels is not None:
        ref["val_accuracy"] = float((evaluator.classify(val.images) == val.labels).double().mean())
    evaluator._reference[key] = ref
    return ref


def _fd_train_val(evaluator: ReferenceEvaluator, ref: dict[str, Any], n: int, seed: int) -> float:
    """``n`` seeded train images against val: the FD a model of the training distribution still shows."""
    g = torch.Generator().manual_seed(int(seed))
    train = ref["train"]
    idx = torch.randperm(len(train), generator=g)[: min(n, len(train))]
    return frechet_distance_from_stats(
        *gaussian_stats(evaluator.features(train.images[idx])), *ref["val_stats"]
    )


def evaluate_images(
    images: torch.Tensor,
    prompts: list[str],
    labels: list[int] | torch.Tensor | None,
    evaluator: ReferenceEvaluator,
    dataset_dir: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """All figures for uint8 ``images (N, C, H, W)`` generated from ``prompts`` (one per image).

    ``labels`` (one per image, or None) are the classes the prompts ask for; ``dataset_dir``
    defaults to the folder the evaluator was made for; ``seed`` picks the train images of
    ``eval/fd_train_val``.
    """
    dataset_dir = dataset_dir if dataset_dir is not None else getattr(evaluator, "dataset_dir", None)
    if dataset_dir is None:
        raise ValueError("evaluate_images needs dataset_dir (the evaluator was not made from a folder)")
    evaluator.check_images(images)
    n = images.shape[0]
    if len(prompts) != n:
        raise ValueError(f"{n} images but {len(prompts)} prompts; give one prompt per image")
    if n < 2:
        raise ValueError("need at least 2 images to estimate FD and diversity")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (n,):
            raise ValueError(f"{n} images but labels of shape {tuple(labels.shape)}")
    ref = reference_statistics(evaluator, dataset_dir)
    feats = evaluator.features(images)  # (N, F)
    emb = evaluator.image_embeddings(feats)  # (N, E)

    fd_train_val = _fd_train_val(evaluator, ref, n, seed)
    use_labels = labels is not None and ref["val"].labels is not None
    diversity = group_diversity(feats, labels if use_labels else None)
    real_diversity = ref["diversity_real"] if use_labels else group_diversity(ref["val_features"], None)
    ratio = diversity / real_diversity if real_diversity > 0 else float("inf")
    copy_fraction = float(
        (nearest_distances(pixels(images), ref["train_pixels"]) < ref["copy_distance"]).float().mean()
    )
    result: dict[str, Any] = {
        "eval/fd": frechet_distance(feats, ref["val_features"]),
        "eval/fd_train_val": fd_train_val,
        "eval/clip_score": 100.0 * float((emb * evaluator.text_embeddings(list(prompts))).sum(1).mean()),
        "eval/clip_score_val": ref["clip_score_val"],
    }
    if labels is not None and evaluator.has_classifier:
        result["eval/cond_accuracy"] = float((evaluator.classify(images) == labels).double().mean())
    if "val_accuracy" in ref:
        result["eval/val_accuracy"] = ref["val_accuracy"]
    result.update(
        {
            "eval/diversity": ratio,
            "eval/diversity_generated": diversity,
            "eval/diversity_real": real_diversity,
            "eval/copy_fraction": copy_fraction,
            "collapse": bool(ratio < COLLAPSE_BELOW),
            "copying": bool(copy_fraction > COPYING_ABOVE),
            "criteria": {
                "collapse_below": COLLAPSE_BELOW,
                "copying_above": COPYING_ABOVE,
                "copy_distance": ref["copy_distance"],
            },
            "evaluator_hash": evaluator.hash,
            "data_version": evaluator.data_version,
            "num_samples": n,
            "seed": int(seed),
        }
    )
    return result


def evaluation_prompts(
    dataset_dir: str | Path, num_samples: int, seed: int = 0
) -> tuple[list[str], list[int] | None, str]:
    """The prompts (and labels they ask for) that a model is evaluated on, and where they come from.

    The digits dataset: captions of the held-out template (never in any shard), labels 0..9 in
    turn, so 500 samples are 50 per class. Any other dataset: val captions in a seeded random order
    (with repeats only when the val split is smaller than ``num_samples``) and their labels if any.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    if read_manifest(dataset_dir)["source"].get("type") == "digits":
        from aigc.data.captions import heldout_captions

        labels = [i % 10 for i in range(num_samples)]
        return [heldout_captions(label) for label in labels], labels, "heldout"
    val = read_split(dataset_dir, "val", max_images=MAX_REFERENCE_IMAGES)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(val), num_samples, replace=num_samples > len(val))
    labels = val.labels[torch.as_tensor(idx)].tolist() if val.labels is not None else None
    return [val.captions[i] for i in idx], labels, "val"


def _batch_seed(seed: int, batch: int) -> int:
    """Independent per-batch seeds (seed s batch b must not equal seed s+1 batch b-1)."""
    return int(np.random.SeedSequence([int(seed), batch]).generate_state(1)[0])


def generate_images(
    module: Any, prompts: list[str], seed: int = 0, batch_size: int = 100, **options: Any
) -> torch.Tensor:
    """One image per prompt from ``module.generate``, in batches, deterministic for ``seed``."""
    out = [
        module.generate(prompts[i : i + batch_size], num_samples=1, seed=_batch_seed(seed, b), **options)
        for b, i in enumerate(range(0, len(prompts), batch_size))
    ]
    return torch.cat(out)


def evaluate_model(
    module: Any,
    evaluator: ReferenceEvaluator,
    dataset_dir: str | Path,
    num_samples: int = DEFAULT_EVAL_SAMPLES,
    seed: int = 0,
    batch_size: int = 100,
    **generate_options: Any,
) -> dict[str, Any]:
    """Generate ``num_samples`` images from the evaluation prompts and measure every figure.

    An autoencoder is measured by reconstruction instead (:func:`evaluate_reconstruction`); family
    options do not apply to it."""
    if getattr(module, "family", None) == "autoencoder":
        if generate_options:
            raise ValueError(
                f"an autoencoder is evaluated by reconstruction: generate options "
                f"{sorted(generate_options)} do not apply"
            )
        return evaluate_reconstruction(module, evaluator, dataset_dir, num_samples, seed, batch_size)
    _check_shape(module, evaluator, dataset_dir)
    prompts, labels, source = evaluation_prompts(dataset_dir, num_samples, seed)
    start = time.perf_counter()
    images = generate_images(module, prompts, seed, batch_size, **generate_options)
    seconds = time.perf_counter() - start
    result = evaluate_images(images, prompts, labels, evaluator, dataset_dir=dataset_dir, seed=seed)
    result.update(
        {
            "family": getattr(module, "family", None),
            "generate_options": dict(generate_options),
            "prompts": source,
            "batch_size": batch_size,
            "sampling_seconds": round(seconds, 3),
            "perf/sampling_images_per_s": num_samples / seconds if seconds > 0 else float("inf"),
        }
    )
    return result


def _check_shape(module: Any, evaluator: ReferenceEvaluator, dataset_dir: str | Path) -> None:
    c, s = evaluator.config.channels, evaluator.config.image_size
    if (getattr(module, "channels", c), getattr(module, "image_size", s)) != (c, s):
        raise ValueError(
            f"the model makes {module.channels}x{module.image_size}x{module.image_size} images; "
            f"the evaluator of {dataset_dir} measures {c}x{s}x{s}"
        )


def evaluate_reconstruction(
    module: Any,
    evaluator: ReferenceEvaluator,
    dataset_dir: str | Path,
    num_samples: int = DEFAULT_EVAL_SAMPLES,
    seed: int = 0,
    batch_size: int = 100,
) -> dict[str, Any]:
    """Reconstruct ``num_samples`` val images (a seeded choice, with repeats only when the val split
    is smaller) with ``module.reconstruct`` and measure them against their originals.

    Figures: ``eval/mse`` (on [0, 255], over every pixel of every image), ``eval/psnr`` =
    10 log10(255^2 / eval/mse) in dB (inf for a perfect reconstruction), ``eval/fd`` between evaluator
    features of the reconstructions and of the originals (lower is better, as for a generative
    model, so the registry's gate works unchanged), ``eval/fd_train_val`` as in
    :func:`evaluate_images`. ``collapse`` and ``copying`` are always False: they judge samples drawn
    from a model, and a reconstruction is meant to copy its input.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    _check_shape(module, evaluator, dataset_dir)
    ref = reference_statistics(evaluator, dataset_dir)
    val = ref["val"]
    rng = np.random.default_rng(seed)
    idx = torch.as_tensor(rng.choice(len(val), num_samples, replace=num_samples > len(val)))
    originals = val.images[idx]  # (N, C, H, W) uint8
    start = time.perf_counter()
    recon = torch.cat(
        [module.reconstruct(originals[i : i + batch_size]) for i in range(0, num_samples, batch_size)]
    )
    seconds = time.perf_counter() - start
    evaluator.check_images(recon)
    mse = float((recon.double() - originals.double()).pow(2).mean())
    return {
        "eval/psnr": 10.0 * math.log10(255.0**2 / mse) if mse > 0 else float("inf"),
        "eval/mse": mse,
        "eval/fd": frechet_distance(evaluator.features(recon), evaluator.features(originals)),
        "eval/fd_train_val": _fd_train_val(evaluator, ref, num_samples, seed),
        "collapse": False,
        "copying": False,
        "evaluator_hash": evaluator.hash,
        "data_version": evaluator.data_version,
        "num_samples": num_samples,
        "seed": int(seed),
        "family": getattr(module, "family", None),
        "prompts": "reconstruction of val images",
        "batch_size": batch_size,
        "reconstruction_seconds": round(seconds, 3),
        "perf/reconstruction_images_per_s": num_samples / seconds if seconds > 0 else float("inf"),
    }


def comparable(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two results were measured the same way: same evaluator, data, sample count, seed."""
    return all(a.get(k) is not None and a.get(k) == b.get(k) for k in PROVENANCE)
