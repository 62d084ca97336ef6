"""The reference evaluator of one dataset: trained once on its train split, cached, identified by hash.

A cache folder holds ``weights.safetensors`` (dual encoder, and classifier where the data has
labels; no pickle), ``config.json`` (architecture and training settings, data version, training
figures) and ``tokenizer.json``. The evaluator hash is the sha256 of those three files, so any
figure that records it says exactly which networks measured it.

Default cache: ``<project root>/.cache/evaluators/<data version>/`` (git-ignored). A non-default
:class:`EvaluatorConfig` gets ``<data version>-<config hash>/`` so it never shadows the default.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aigc import project_root
from aigc.data.manifest import read_manifest
from aigc.data.version import version as data_version
from aigc.evaluation.data import SplitData, read_split
from aigc.evaluation.nets import DualEncoder, EvaluatorConfig, ImageClassifier
from aigc.evaluation.training import accuracy, to_float, train_classifier, train_dual_encoder
from aigc.models.text import Tokenizer

FORMAT = "aigc-evaluator/1"
FILES = ("weights.safetensors", "config.json", "tokenizer.json")


# What config.json records about how long the training took: not part of what the evaluator is, so
# two trainings of the same weights (same data, config, seed and thread count) get the same hash and
# their results stay comparable (the gate and lineage compare evaluator hashes).
UNHASHED = ("train_seconds",)


def files_hash(folder: Path) -> str:
    """sha256 over the evaluator's files in a fixed order, config.json without :data:`UNHASHED`."""
    h = hashlib.sha256()
    for name in FILES:
        data = (folder / name).read_bytes()
        if name == "config.json":
            doc = {k: v for k, v in json.loads(data).items() if k not in UNHASHED}
            data = json.dumps(doc, indent=2, sort_keys=True).encode("utf-8")
        h.update(name.encode("utf-8"))
        h.update(data)
    return h.hexdigest()


class ReferenceEvaluator:
    """Feature extractor, image-text scorer and (with labels) classifier of one dataset.

    Use :func:`reference_evaluator` to get one; the ``eval/*`` figures are computed by
    :mod:`aigc.evaluation.evaluate`.
    """

    def __init__(
        self,
        config: EvaluatorConfig,
        tokenizer: Tokenizer,
        dual: DualEncoder,
        classifier: ImageClassifier | None,
        info: dict[str, Any],
        path: Path | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.dual = dual.eval()
        self.classifier = classifier.eval() if classifier is not None else None
        self.info = info  # data_version, dataset name, training figures
        self.path = path
        self.hash = files_hash(path) if path is not None else None
        self._reference: dict[str, Any] = {}  # per-dataset reference statistics (evaluate.py)
        self.dataset_dir: str | None = None  # the folder it was made for, when known (not saved)

    @property
    def data_version(self) -> str:
        return str(self.info["data_version"])

    @property
    def has_classifier(self) -> bool:
        return self.classifier is not None

    def __repr__(self) -> str:
        return (
            f"ReferenceEvaluator(hash={(self.hash or 'unsaved')[:12]}, data_version={self.data_version}, "
            f"{self.config.channels}x{self.config.image_size}x{self.config.image_size}, "
            f"classes={self.config.num_classes})"
        )

    # ----------------------------------------------------------------------------- applying it
    def check_images(self, images: torch.Tensor) -> None:
        """A clear error unless ``images`` is uint8 ``(N, C, H, W)`` of this evaluator's shape."""
        c, s = self.config.channels, self.config.image_size
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(
                f"expected uint8 images of shape (N, {c}, {s}, {s}) for this evaluator, "
                f"got {images.dtype} {tuple(images.shape)}"
            )

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """uint8 ``(N, C, H, W)`` -> FD features float32 ``(N, feature_dim)``."""
        self.check_images(images)
        out = [
            self.dual.image_features(to_float(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out)

    @torch.no_grad()
    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``(N, feature_dim)`` -> unit embeddings ``(N, embed_dim)``."""
        return self.dual.image_embeddings(features)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str], batch_size: int = 1024) -> torch.Tensor:
        """Prompts -> unit embeddings ``(N, embed_dim)``; each distinct prompt is encoded once."""
        uniq = list(dict.fromkeys(prompts))
        index = {p: i for i, p in enumerate(uniq)}
        emb = []
        for i in range(0, len(uniq), batch_size):
            ids, mask = self.tokenizer.encode(uniq[i : i + batch_size], self.config.max_tokens)
            emb.append(self.dual.text_embeddings(ids, mask))
        return torch.cat(emb)[[index[p] for p in prompts]]

    @torch.no_grad()
    def classify(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """uint8 ``(N, C, H, W)`` -> predicted labels ``(N,)``; needs a labelled dataset."""
        if self.classifier is None:
            raise ValueError("this evaluator has no classifier: its dataset has no labels")
        self.check_images(images)
        return torch.cat(
            [
                self.classifier(to_float(images[i : i + batch_size])).argmax(1)
                for i in range(0, len(images), batch_size)
            ]
        )

    # ---------------------------------------------------------------------------- save and load
    def save(self, folder: str | Path) -> Path:
        """Write the three files to ``folder`` and set :attr:`path` and :attr:`hash`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            f"dual.{k}": v.detach().cpu().contiguous().clone() for k, v in self.dual.state_dict().items()
        }
        if self.classifier is not None:
            state.update(
                {
                    f"classifier.{k}": v.detach().cpu().contiguous().clone()
                    for k, v in self.classifier.state_dict().items()
                }
            )
        save_file(state, str(folder / "weights.safetensors"), metadata={"format": FORMAT})
        doc = {"format": FORMAT, "config": self.config.to_dict(), **self.info}
        (folder / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True), encoding="utf-8")
        self.tokenizer.save(folder / "tokenizer.json")
        self.path, self.hash = folder, files_hash(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ReferenceEvaluator:
        """Load an evaluator folder written by :meth:`save`."""
        folder = Path(folder)
        for name in FILES:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a reference evaluator: {name} is missing")
        doc = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if doc.get("format") != FORMAT:
            raise ValueError(f"{folder}/config.json: format {doc.get('format')!r}, expected {FORMAT!r}")
        cfg = EvaluatorConfig.from_dict(doc["config"])
        tokenizer = Tokenizer.load(folder / "tokenizer.json")
        state = load_file(str(folder / "weights.safetensors"))
        dual = DualEncoder(cfg, len(tokenizer))
        dual.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("dual.")})
        classifier = None
        if cfg.num_classes > 0:
            classifier = ImageClassifier(cfg)
            classifier.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("classifier.")})
        info = {k: v for k, v in doc.items() if k not in ("format", "config")}
        return cls(cfg, tokenizer, dual, classifier, info, path=folder)


def config_for(train: SplitData, base: EvaluatorConfig | None = None) -> EvaluatorConfig:
    """``base`` (default settings) with the image shape and class count of the data."""
    d = (base or EvaluatorConfig()).to_dict()
    _, c, h, w = train.images.shape
    if h != w:
        raise ValueError(f"the evaluator needs square images, got {h}x{w}")
    d.update(
        image_size=int(h),
        channels=int(c),
        num_classes=int(train.labels.max()) + 1 if train.labels is not None else 0,
    )
    return EvaluatorConfig.from_dict(d)


def training_threads(default: int = 1) -> int:
    """Intra-op threads for training: ``AIGC_EVALUATOR_THREADS`` if set, else ``default`` (1 unless
    the caller knows the cores are free: ``aigc train`` passes the cores its job was given).

    The networks are small (batches of 8x8 images), so extra threads gain little, and on a
    machine shared with other jobs they cost a lot: on the 2-core development machine under load,
    2 threads took 373 s where 1 thread took 37 s (OpenMP threads spin waiting for each other).
    """
    value = os.environ.get("AIGC_EVALUATOR_THREADS", str(default))
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"AIGC_EVALUATOR_THREADS must be a positive integer, got {value!r}") from None
    if threads < 1:
        raise ValueError(f"AIGC_EVALUATOR_THREADS must be a positive integer, got {value!r}")
    return threads


def train_evaluator(
    dataset_dir: str | Path,
    config: EvaluatorConfig | None = None,
    progress: Callable[[str], None] | None = None,
    threads: int = 1,
) -> ReferenceEvaluator:
    """Train a (not yet saved) evaluator on ``dataset_dir``'s train split; figures on its val split.

    Runs on the CPU with ``training_threads(threads)`` threads (restored afterwards).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(training_threads(threads))
    try:
        return _train(dataset_dir, config, progress)
    finally:
        torch.set_num_threads(previous)


def _train(
    dataset_dir: str | Path, config: EvaluatorConfig | None, progress: Callable[[str], None] | None
) -> ReferenceEvaluator:
    start = time.perf_counter()
    base = config or EvaluatorConfig()
    train = read_split(dataset_dir, "train", max_images=base.max_train_images)
    val = read_split(dataset_dir, "val", channels=int(train.images.shape[1]))
    cfg = config_for(train, base)
    tokenizer = Tokenizer.build(train.captions)
    dual = train_dual_encoder(cfg, tokenizer, train, progress)
    classifier = None
    info: dict[str, Any] = {
        "data_version": data_version(dataset_dir),
        "dataset": read_manifest(dataset_dir)["name"],
        "train_images": len(train),
        "val_images": len(val),
    }
    if cfg.num_classes > 0:
        classifier = train_classifier(cfg, train, progress)
        if val.labels is not None:
            info["val_accuracy"] = accuracy(classifier, val)
    info["train_seconds"] = round(time.perf_counter() - start, 2)
    info["torch_threads"] = torch.get_num_threads()
    if progress:
        acc = f", classifier val accuracy {info['val_accuracy']:.4f}" if "val_accuracy" in info else ""
        progress(f"evaluator trained in {info['train_seconds']:.1f} s{acc}")
    return ReferenceEvaluator(cfg, tokenizer, dual, classifier, info)


def default_cache_dir() -> Path:
    """``AIGC_EVALUATOR_CACHE`` if set, else ``<project root>/.cache/evaluators``."""
    env = os.environ.get("AIGC_EVALUATOR_CACHE")
    return Path(env).expanduser() if env else project_root() / ".cache" / "evaluators"


def reference_evaluator(
    dataset_dir: str | Path,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    config: EvaluatorConfig | None = None,
    threads: int = 1,
) -> ReferenceEvaluator:
    """The evaluator of ``dataset_dir``: loaded from ``cache_dir/<data version>/``, else trained and saved.

    ``cache_dir`` defaults to :func:`default_cache_dir`; training runs on ``threads`` torch threads
    (see :func:`training_threads`) and reports every 100 steps through ``progress``. Training
    writes to a temporary folder renamed into place, so a concurrent process never loads a
    half-written evaluator; if two train at once, the first rename wins and the other loads it.
    """
    version = data_version(dataset_dir)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = version
    if config is not None and config.to_dict() != EvaluatorConfig().to_dict():
        blob = json.dumps(config.to_dict(), sort_keys=True).encode("utf-8")
        name = f"{version}-{hashlib.sha256(blob).hexdigest()[:8]}"
    folder = root / name
    evaluator = _try_load(folder, version, progress)
    if evaluator is None:
        evaluator = _train_and_save(dataset_dir, config, progress, root, name, version, threads)
    evaluator.dataset_dir = str(dataset_dir)
    return evaluator


def _train_and_save(
    dataset_dir: str | Path,
    config: EvaluatorConfig | None,
    progress: Callable[[str], None] | None,
    root: Path,
    name: str,
    version: str,
    threads: int,
) -> ReferenceEvaluator:
    folder = root / name
    if progress:
        progress(
            f"training the reference evaluator of {dataset_dir} (data version {version}, once per "
            f"dataset version) on {training_threads(threads)} thread(s)"
        )
    evaluator = train_evaluator(dataset_dir, config, progress, threads)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    evaluator.save(tmp)
    winner = _try_load(folder, version, None)  # another process may have saved one meanwhile
    if winner is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return winner
    shutil.rmtree(folder, ignore_errors=True)  # incomplete or of an older format
    try:
        tmp.rename(folder)
    except OSError:  # lost a race after all: use theirs, so everyone shares one hash
        shutil.rmtree(tmp, ignore_errors=True)
    return ReferenceEvaluator.load(folder)


def _try_load(
    folder: Path, version: str, progress: Callable[[str], None] | None
) -> ReferenceEvaluator | None:
    """The cached evaluator in ``folder``; None when absent, incomplete or of an older format."""
    try:
        evaluator = ReferenceEvaluator.load(folder)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, RuntimeError, OSError) as err:  # incl. JSON and safetensors errors
        if progress:
            progress(f"ignoring the evaluator in {folder}: {err}")
        return None
    if evaluator.data_version != version:
        raise ValueError(
            f"{folder} holds an evaluator of data version {evaluator.data_version}, "
            f"not {version}; delete the folder"
        )
    return evaluator
