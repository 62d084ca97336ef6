"""Typed configuration: errors name the dotted key and what is allowed; every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aigc.config import (
    ConfigError,
    DataConfig,
    DiffusionConfig,
    GANConfig,
    RunConfig,
    apply_overrides,
    load_config,
    validate,
)

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_load() -> None:
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert isinstance(cfg.model, DiffusionConfig)
    assert cfg.data.name == "digits"


def test_unknown_key_names_dotted_key_and_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, {"trainer": {"max_stepz": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "trainer.max_stepz" in msg
    assert "unknown key" in msg
    assert "max_steps" in msg  # the allowed keys are listed


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("trainer.max_stepz=5", "trainer.max_steps"),
        ("trainr.max_steps=5", "trainer"),
        ("model.sampelr=ddim", "model.sampler"),
        ("model.text.encodr=minilm", "model.text.encoder"),
        ("data.imagesize=16", "data.image_size"),
    ],
)
def test_unknown_key_says_the_closest_allowed_key(override: str, meant: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    msg = str(err.value)
    assert f"did you mean `{meant}`?" in msg
    assert "allowed keys here:" in msg  # the full list stays


def test_unknown_key_far_from_every_allowed_key_suggests_nothing() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["trainer.zzzz=1"])
    assert "did you mean" not in str(err.value)
    assert "max_steps" in str(err.value)


def test_unknown_key_inside_family(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {"model": {"family": "gan", "stepz": 1}}))
    assert "model.stepz" in str(err.value)
    assert "latent_dim" in str(err.value)


def test_wrong_type_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {"data": {"batch_size": "many"}}))
    assert "data.batch_size" in str(err.value)
    assert "integer" in str(err.value)


def test_out_of_range_names_key_and_bound() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["data.val_fraction=1.5"])
    assert "data.val_fraction" in str(err.value)
    assert "less than 1" in str(err.value)


def test_literal_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.sampler=euler"])
    msg = str(err.value)
    assert "model.sampler" in msg and "'ddim'" in msg and "'ddpm'" in msg


def test_unknown_family_lists_families() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.family=flow"])
    msg = str(err.value)
    assert "model" in msg and "diffusion" in msg and "autoregressive" in msg


def test_dotted_overrides_parse_yaml_values() -> None:
    cfg = load_config(
        overrides=[
            "trainer.max_steps=200",
            "trainer.grad_clip=null",
            "model.family=gan",
            "model.latent_dim=32",
            "data.name=my-set",
        ]
    )
    assert cfg.trainer.max_steps == 200
    assert cfg.trainer.grad_clip is None
    assert isinstance(cfg.model, GANConfig) and cfg.model.latent_dim == 32
    assert cfg.data.name == "my-set"


@pytest.mark.parametrize("bad", ["trainer.max_steps", "=3", "trainer..x=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError):
        apply_overrides({}, [bad])


def test_override_into_scalar_is_error() -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides({"trainer": 3}, ["trainer.max_steps=1"])
    assert "trainer is not a section" in str(err.value)


def test_validate_with_prefix() -> None:
    with pytest.raises(ConfigError) as err:
        validate(DataConfig, {"imagesize": 8}, prefix="data")
    assert "data.imagesize" in str(err.value)
    assert "image_size" in str(err.value)


def test_bad_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def shipped_yaml() -> list[Path]:
    skip = {".venv", ".git", ".dvc", "node_modules"}
    return sorted(
        p
        for p in ROOT.rglob("*.y*ml")
        if p.suffix in (".yaml", ".yml") and not skip.intersection(p.relative_to(ROOT).parts)
    )


def test_every_shipped_yaml_loads() -> None:
    files = shipped_yaml()
    assert files, "no YAML shipped?"
    for path in files:
        # Kubernetes manifests hold several documents (tests/unit/test_k8s.py checks them).
        documents = list(yaml.safe_load_all(path.read_text()))
        data = documents[0] if len(documents) == 1 else documents
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "models":
            # A run config: must validate completely.
            load_config(path)
        elif rel.name == "params.yaml":
            # DVC params: its data section is a DataConfig.
            validate(DataConfig, data.get("data", {}), prefix="data")
        else:
            assert data is not None, f"{rel} is empty"


@pytest.mark.parametrize(
    ("value", "workers", "elastic"),
    [("3", 3, False), ("[1, 4]", (1, 4), True), ("1-4", (1, 4), True), ("[2, 2]", 2, False)],
)
def test_workers_are_a_count_or_an_elastic_range(value: str, workers, elastic: bool) -> None:
    sc = load_config(None, [f"scaling.num_workers={value}"]).scaling
    assert (sc.num_workers, sc.elastic) == (workers, elastic)
    lo, hi = workers if elastic else (workers, workers)
    assert (sc.min_workers, sc.max_workers) == (lo, hi)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "workers must be >= 1, got 0"),
        ("[3, 1]", "need 1 <= MIN <= MAX"),
        ("[1, 2, 3]", "N or MIN-MAX"),
        ("two", "N or MIN-MAX"),
        ("1-x", "whole numbers"),
    ],
)
def test_bad_workers_name_the_key_and_the_forms(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"scaling.num_workers={value}"])
    assert "scaling.num_workers" in str(err.value) and message in str(err.value)


def test_the_workers_flag_takes_a_range_and_names_itself_in_errors() -> None:
    from aigc.training import TrainRequest

    assert TrainRequest.of(None, workers="2-6").run_config().scaling.num_workers == (2, 6)
    assert TrainRequest.of(None, workers="5").run_config().scaling.num_workers == 5
    with pytest.raises(ConfigError, match="--workers: workers range 6-2"):
        TrainRequest.of(None, workers="6-2").run_config()


def test_the_checkpoint_metric_is_a_figure_the_family_is_measured_by() -> None:
    cfg = load_config(None, ["trainer.eval_every_steps=50", "trainer.checkpoint_metric=eval/clip_score"])
    assert cfg.trainer.checkpoint_mode == "max"
    assert load_config(None, []).trainer.checkpoint_mode == "min"  # eval/fd: lower is better
    with pytest.raises(ConfigError) as err:
        load_config(None, ["trainer.checkpoint_metric=eval/fid"])
    assert "trainer.checkpoint_metric" in str(err.value) and "eval/fd, eval/clip_score" in str(err.value)
    # An autoencoder is measured by reconstruction: no CLIP score, and PSNR only there.
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.family=autoencoder", "trainer.checkpoint_metric=eval/clip_score"])
    assert "allowed: eval/fd, eval/psnr, eval/mse" in str(err.value)
    assert load_config(None, ["model.family=autoencoder", "trainer.checkpoint_metric=eval/psnr"])
    with pytest.raises(ConfigError, match="not measured for family diffusion"):
        load_config(None, ["trainer.checkpoint_metric=eval/psnr"])
