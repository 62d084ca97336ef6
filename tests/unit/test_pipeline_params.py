"""aigc.workflows.pipeline: the params.yaml sections the DVC stages read, and the records they pass on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aigc.config import ConfigError, load_config
from aigc.workflows.pipeline import as_overrides, params_section, run_of, train_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_train_overrides_read_the_section_named_after_the_config_file(tmp_path: Path) -> None:
    """models/latent-diffusion.yaml is of the diffusion family but has its own section: the two
    configs are two DVC stages with their own settings."""
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "train": {
                    "diffusion": {"trainer": {"max_steps": 7}},
                    "latent-diffusion": {"trainer": {"max_steps": 9}, "tracking": {"experiment": "p"}},
                }
            }
        )
    )
    latent = ROOT / "models" / "latent-diffusion.yaml"
    assert load_config(latent).model.family == "diffusion"
    assert sorted(train_overrides(params, latent)) == ['tracking.experiment="p"', "trainer.max_steps=9"]
    assert train_overrides(params, ROOT / "models" / "diffusion.yaml") == ["trainer.max_steps=7"]
    assert train_overrides(params, ROOT / "models" / "gan.yaml") == []  # no section: no overrides
    # The overrides apply to the config they were read for.
    cfg = load_config(latent, train_overrides(params, latent))
    assert cfg.trainer.max_steps == 9 and cfg.tracking.experiment == "p"


def test_every_train_section_of_the_projects_params_names_a_shipped_config_and_a_dvc_stage() -> None:
    """A section without models/<name>.yaml would silently apply to nothing; one without a
    train@<name> stage would never run."""
    sections = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages["train"]["foreach"]) == list(sections)
    for name, item in stages["train"]["foreach"].items():
        config = ROOT / "models" / f"{name}.yaml"
        cfg = load_config(config, train_overrides(ROOT / "params.yaml", config))
        assert cfg.tracking.experiment == "aigc-pipeline", name
        # The module the stage depends on is the config's family's own module.
        assert item["module"] == cfg.model.family, name
        data = "digits-latents" if cfg.data.source == "latents" else "digits"
        assert item["data"] == data == cfg.data.name, name


def test_params_section_names_the_key_that_is_not_a_mapping(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  diffusion: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml: train.diffusion: expected a mapping, got 3"):
        params_section(params, "train", "diffusion")
    params.write_text("train: [a]\n")
    with pytest.raises(ConfigError, match=r"params.yaml: train: expected a mapping"):
        params_section(params, "train", "diffusion")
    assert as_overrides({"model": {"channel_mults": [1, 2]}, "x": "y"}) == [
        "model.channel_mults=[1, 2]",
        'x="y"',
    ]


def test_run_of_reads_a_train_record_and_names_what_is_wrong_with_another_file(tmp_path: Path) -> None:
    record = tmp_path / "train.json"
    record.write_text(json.dumps({"run_id": "abc", "step": 3}))
    assert run_of(record) == "abc"
    record.write_text(json.dumps({"step": 3}))
    with pytest.raises(ConfigError, match="train.json: no run_id; it should be the --metrics-out file"):
        run_of(record)
    with pytest.raises(ConfigError, match="missing.json: not a readable `aigc train --metrics-out` file"):
        run_of(tmp_path / "missing.json")


def test_every_code_dependency_in_dvc_yaml_exists() -> None:
    """A module that moves (or a stage that starts importing a new one) must move in dvc.yaml too,
    or editing it would not make the stage stale: every src/ dependency of every stage exists."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        items = stage.get("foreach")
        items = list(items.values()) if isinstance(items, dict) else [{"module": None}]
        for dep in body.get("deps", []):
            if not dep.startswith("src/"):
                continue
            for item in items:
                path = dep.replace("${item.module}", str((item or {}).get("module")))
                if not (ROOT / path).exists():
                    missing.append(f"{name}: {path}")
    assert not missing, f"dvc.yaml names code that does not exist: {missing}"
