"""Starting a model from another's weights: ``aigc train --init-from`` (fine-tuning).

The source is always an export folder (:mod:`aigc.models.export`: safetensors + JSON, no pickle);
a registered version or a run is first exported to one (``aigc.workflows.train.resolve_init``). The job
copies it into its run folder (:data:`aigc.contract.INIT_DIR`), and every worker loads it before
step 0 (:func:`load_init`), so a resume before the first checkpoint starts from the same weights.

The new model is built from the run's config as usual; the source's weights then replace its
initial ones, tensor by tensor, except:

- the tokenizer: the new run's is the source's, extended by the new captions' words
  (:meth:`Tokenizer.extend`): existing ids keep their rows of the text embedding, new words get the
  new model's fresh rows (zeros in a LoRA model's frozen embedding), so a word seen before keeps its
  embedding;
- the EMA's update counter: it starts at 0, so the EMA warms up again from the source's EMA weights;
- a LoRA model's adapters (``*lora_*``): they start fresh, and the base weights they wrap
  (``<layer>.base_layer.*``) are the source's ``<layer>.*`` (:mod:`aigc.models.lora`);
- a latent model's ``autoencoder.*``: that comes from the dataset (it must be the autoencoder the
  source learned on, checked by its sha256).

Anything else that differs in shape is an :class:`InitError` naming every such tensor and the model
config keys whose values differ from the source's (the keys that size those tensors).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec

from aigc.contract import EXPORT_FILES, TAG_INIT_FROM
from aigc.models.lora import base_key, is_adapter_key
from aigc.models.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch is imported by the functions that load weights: the driver resolves first
    import torch

    from aigc.models.base import GenerativeModule

#: the text-embedding tables whose rows are tokenizer ids (``aigc.models.text.TextEncoder.token``),
#: in the module and in the diffusion family's EMA copy
_VOCAB_TABLE = "text_encoder.token.weight"
_AUTOENCODER = "autoencoder."
#: the EMA's update counter (``ema_update``'s warm-up), a buffer of the families that keep an EMA
_EMA_COUNTER = "ema_updates"


class InitError(ValueError):
    """A model cannot start from the source it was given; the message says what differs."""


@dataclass(frozen=True)
class InitSource:
    """A resolved ``--init-from``: a local export folder, and what it is for the run's lineage."""

    path: Path
    ref: str  # as the user gave it
    label: str  # for messages: "aigc-digits v3 (run ...)", a path
    tags: dict[str, str] = field(default_factory=dict)  # aigc.init.* tags of the new run


def export_source(ref: str) -> InitSource:
    """``--init-from PATH``: an export folder (``aigc export``, or a version's ``export/`` artifact)."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise InitError(
            f"--init-from {ref!r}: no export folder there (a registered version such as "
            "aigc-vae@production, or a run, is looked up by `aigc train`: "
            "aigc.workflows.train.train_and_register)"
        )
    missing = [f for f in EXPORT_FILES if not (path / f).is_file()]
    if missing:
        raise InitError(f"--init-from {ref!r}: not an aigc export folder ({', '.join(missing)} missing)")
    path = path.resolve()
    return InitSource(path=path, ref=ref, label=str(path), tags={TAG_INIT_FROM: ref})


def read_config(location: str | Path) -> dict[str, Any]:
    """The ``config.json`` of the export folder at ``location`` (a path or fsspec URL)."""
    with fsspec.open(f"{location}/config.json", "r", encoding="utf-8") as f:
        return json.load(f)


def read_tokenizer(location: str | Path) -> Tokenizer:
    with fsspec.open(f"{location}/tokenizer.json", "r", encoding="utf-8") as f:
        return Tokenizer.from_dict(json.load(f))


def read_weights(location: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors

    with fsspec.open(f"{location}/weights.safetensors", "rb") as f:
        return load_safetensors(f.read())


def check_family(config: Mapping[str, Any], family: str, label: str) -> None:
    if config.get("family") != family:
        raise InitError(
            f"--init-from {label} is a {config.get('family')!r} model; this config trains {family!r} "
            f"(model.family): start from a {family} model, or set model.family to {config.get('family')!r}"
        )


def init_state(
    module: GenerativeModule, source: Mapping[str, torch.Tensor], config: Mapping[str, Any], label: str
) -> dict[str, torch.Tensor]:
    """The state dict ``module`` starts from: the source's tensors, with the text-embedding rows of
    words the source did not know taken from ``module`` (its fresh ones), and a latent model's
    autoencoder left to the dataset. Raises :class:`InitError` naming every tensor that does not fit
    and the config keys that differ from the source's."""
    check_family(config, module.family, label)
    _check_latent(module, config, label)
    own = module.state_dict()
    frozen = module.base_weight_keys()
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, target in own.items():
        if key.startswith(_AUTOENCODER) and module.latent is not None:
            state[key] = target  # the dataset's autoencoder, loaded by the worker after this
            continue
        if key.endswith(_EMA_COUNTER):
            # The EMA's warm-up starts again: the source's EMA weights are where it starts, and with
            # the source's count (decay near its maximum) the first fine-tuning steps would barely
            # move the weights the model samples with (measured: FD 6.1 against 1.8 for LoRA).
            state[key] = target
            continue
        if is_adapter_key(key):
            state[key] = target  # a LoRA adapter of this model: fresh (B = 0, so the model is its base)
            continue
        name = base_key(key)  # a layer PEFT wrapped keeps its base weights under .base_layer
        if name not in source:
            problems.append(f"{key}: not in the source (this model {tuple(target.shape)})")
            continue
        src = source[name]
        if src.shape == target.shape:
            state[key] = src.to(target.dtype)
        elif name.endswith(_VOCAB_TABLE) and src.shape[1:] == target.shape[1:] and len(src) < len(target):
            # The tokenizer grew: ids < len(source vocab) are the source's words (Tokenizer.extend).
            grown = target.detach().clone()
            grown[: src.shape[0]] = src.to(target.dtype)
            if key in frozen:
                # A LoRA model's base embedding: frozen and left out of its checkpoints and exports,
                # so its new words' rows must be the same wherever it is loaded: zeros (the
                # embedding's adapter learns them).
                grown[src.shape[0] :] = 0
            state[key] = grown
        else:
            problems.append(f"{key}: source {tuple(src.shape)}, this model {tuple(target.shape)}")
    for key in sorted(set(source) - {base_key(k) for k in own}):
        if not key.startswith(_AUTOENCODER):
            problems.append(f"{key}: only in the source {tuple(source[key].shape)}")
    if problems:
        keys = differing_keys(config, module)
        # The keys first: with a wider net, hundreds of tensors differ for one key.
        raise InitError(
            f"--init-from {label}: {len(problems)} tensor(s) of the source do not fit this model; "
            "config keys that differ from the source's: "
            + (", ".join(f"{k}: {a!r} (source) vs {b!r}" for k, a, b in keys) or "none")
            + (" (set them to the source's values: --set KEY=VALUE)" if keys else "")
            + "\n  "
            + "\n  ".join(problems)
        )
    return state


def differing_keys(config: Mapping[str, Any], module: GenerativeModule) -> list[tuple[str, Any, Any]]:
    """``(dotted key, source value, this model's value)`` for every model key, image size and channel
    count that differ between the source's ``config.json`` and ``module``."""
    ours = {"model": module.model_cfg.model_dump(mode="json")}
    theirs = {"model": dict(config.get("model", {}))}
    out = [(k, a, b) for k, (a, b) in _flat_diff(theirs, ours).items()]
    for key, name in (("image_size", "data.image_size"), ("channels", "data.channels")):
        if config.get(key) != getattr(module, key):
            out.append((name, config.get(key), getattr(module, key)))
    return out


def _flat_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out |= _flat_diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out[f"{prefix}{key}"] = (x, y)
    return out


def _check_latent(module: GenerativeModule, config: Mapping[str, Any], label: str) -> None:
    theirs, ours = config.get("latent"), module.latent
    if (theirs is None) != (ours is None):
        kind = "latent" if theirs is not None else "pixel"
        raise InitError(
            f"--init-from {label} is a {kind} model and this dataset is "
            f"{'latent' if ours is not None else 'pixel'} data: fine-tune it on data of its kind"
        )
    if theirs is not None and ours is not None:
        a, b = theirs.get("autoencoder_sha256"), ours.get("autoencoder_sha256")
        if a != b:
            raise InitError(
                f"--init-from {label} learned on the latents of autoencoder {str(a)[:12]}, and this "
                f"dataset holds those of autoencoder {str(b)[:12]}: encode the data with the source's "
                "autoencoder (aigc data encode --autoencoder ...)"
            )


def load_init(module: GenerativeModule, location: str | Path) -> None:
    """Load the export folder at ``location`` (a path or URL) into ``module`` (:func:`init_state`)."""
    config = read_config(location)
    state = init_state(module, read_weights(location), config, str(location))
    module.load_state_dict(state, strict=True)
