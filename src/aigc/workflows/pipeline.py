"""What the DVC pipeline's stages need beyond the plain commands: their ``params.yaml`` sections and
the small files DVC tracks as their outputs.

``dvc.yaml`` runs ``data -> reference -> train@<config> -> register@<config>``, with
``train@autoencoder -> encode -> train@latent-diffusion`` for the latent model, each stage a thin
``aigc`` command that reads only its own section of ``params.yaml``:

    data:                       # aigc data build --params params.yaml
    train:
      diffusion:                # aigc train models/diffusion.yaml --params params.yaml
        trainer: {max_steps: 3000}
      latent-diffusion:         # aigc train models/latent-diffusion.yaml --params params.yaml
    register:                   # aigc register ... --params params.yaml (the gate's settings)
      fd_margin: 0.05

``train.<config>`` is named after the config file (its stem), not the model family: two configs of
one family (``diffusion.yaml``, ``latent-diffusion.yaml``) are two stages with their own settings. It
holds only overrides on top of ``models/<config>.yaml`` (the same keys as the YAML, so
``dvc exp run -S train.diffusion.trainer.max_steps=500`` is ``--set trainer.max_steps=500``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from aigc.config import ConfigError, load_yaml


def params_section(params: str | Path, *keys: str) -> dict[str, Any]:
    """The mapping at ``keys`` in the YAML file ``params`` (empty when absent); errors name the key."""
    node: Any = load_yaml(params) or {}
    for i, key in enumerate(keys):
        if not isinstance(node, dict):
            raise ConfigError(f"{params}: {'.'.join(keys[:i])}: expected a mapping, got {node!r}")
        node = node.get(key) or {}
    if not isinstance(node, dict):
        raise ConfigError(f"{params}: {'.'.join(keys)}: expected a mapping, got {node!r}")
    return node


def as_overrides(section: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"trainer": {"max_steps": 5}}`` -> ``["trainer.max_steps=5"]``: the ``--set`` form, so params
    and command-line overrides go through one parser. Values are written as JSON, which YAML reads
    back unchanged (strings stay strings, lists stay lists)."""
    out: list[str] = []
    for key, value in section.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(as_overrides(value, dotted + "."))
        else:
            out.append(f"{dotted}={json.dumps(value)}")
    return out


def train_overrides(params: str | Path, config: str | Path) -> list[str]:
    """The ``train.<stem>`` section of ``params`` as overrides of the config file ``config``.

    ``<stem>`` is the config's file name without ``.yaml`` (``models/latent-diffusion.yaml`` reads
    ``train.latent-diffusion``), so each config of a family has its own section; a missing section
    means no overrides.
    """
    return as_overrides(params_section(params, "train", Path(config).stem))


def write_loss_curve(tracking_uri: str, run_id: str, out: str | Path, key: str = "train/loss") -> Path:
    """The run's ``key`` history as ``step,<key>`` CSV rows, for ``dvc plots``."""
    from aigc.registry.versions import client_for

    history = sorted(client_for(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.step)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["step", key])
        for m in history:
            writer.writerow([m.step, f"{m.value:.6g}"])
    return out


def write_json(out: str | Path, record: dict[str, Any]) -> Path:
    """``record`` as indented, key-sorted JSON (stable diffs in ``dvc metrics diff`` and git)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def run_of(record: str | Path) -> str:
    """The ``run_id`` in a ``--metrics-out`` JSON of ``aigc train`` (what the register stage reads)."""
    try:
        data = json.loads(Path(record).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{record}: not a readable `aigc train --metrics-out` file ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
        raise ConfigError(f"{record}: no run_id; it should be the --metrics-out file of `aigc train`")
    return data["run_id"]
