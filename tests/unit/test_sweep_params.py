"""``aigc sweep``'s search space: param specs, their errors, keys checked against the run config, and
the sweep file (aigc.workflows.sweep). No Ray: what fails here fails before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigc.config import ConfigError
from aigc.workflows.sweep import (
    ParamSpec,
    check_params,
    load_sweep_file,
    parse_param,
    parse_params,
    trial_index,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "models" / "diffusion.yaml"


@pytest.mark.parametrize(
    "text, kind, args",
    [
        ("trainer.lr=loguniform:1e-4:1e-2", "loguniform", (1e-4, 1e-2)),
        ("trainer.lr=uniform:0.001:0.01", "uniform", (0.001, 0.01)),
        ("model.base_channels=choice:32,64", "choice", (32, 64)),
        ("trainer.lr_schedule=grid:constant,cosine", "grid", ("constant", "cosine")),
        ("trainer.seed=randint:0:3", "randint", (0, 3)),
    ],
)
def test_specs_parse_into_kind_and_values(text, kind, args):
    spec = parse_param(text)
    assert (spec.key, spec.kind, spec.args) == (text.split("=")[0], kind, args)
    # The spec reads back as written (the parent run's params), and parses to itself.
    assert parse_param(f"{spec.key}={spec.text}") == spec


def test_values_become_overrides_as_set_reads_them():
    spec = parse_param("model.base_channels=choice:32,64")
    assert [spec.override(v) for v in spec.args] == ["model.base_channels=32", "model.base_channels=64"]
    assert parse_param("trainer.lr=loguniform:1e-4:1e-2").override(0.0005) == "trainer.lr=0.0005"


def test_tune_domains_sample_inside_the_space():
    import random

    random.seed(0)
    lr = parse_param("trainer.lr=loguniform:1e-4:1e-2").domain()
    assert all(1e-4 <= x <= 1e-2 for x in lr.sample(size=50))
    # randint includes both ends (Tune's own excludes the upper one).
    seeds = set(parse_param("trainer.seed=randint:0:2").domain().sample(size=200))
    assert seeds == {0, 1, 2}
    assert parse_param("trainer.lr=grid:0.1,0.2").domain() == {"grid_search": [0.1, 0.2]}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("trainer.lr", "expected KEY=SPEC"),
        ("trainer.lr=normal:0:1", "trainer.lr=normal:0:1: unknown form; allowed: uniform:LOW:HIGH"),
        ("trainer.lr=uniform:1", "uniform needs two numbers"),
        ("trainer.lr=uniform:a:b", "uniform needs two numbers"),
        ("trainer.lr=uniform:0.1:0.01", "LOW must be below HIGH"),
        ("trainer.lr=loguniform:0:1", "loguniform needs LOW > 0"),
        ("trainer.seed=randint:0.5:3", "randint needs integers"),
        ("model.base_channels=choice:", "choice needs values separated by commas"),
        ("model.base_channels=choice:32,,64", "choice needs values"),
        ("model.base_channels=grid:32,32", "given twice"),
    ],
)
def test_a_bad_spec_names_the_param_and_what_is_allowed(text, expected):
    with pytest.raises(ConfigError, match="--param") as err:
        parse_param(text)
    assert expected in str(err.value)
    assert text.split("=")[0] in str(err.value)


def test_a_key_given_twice_is_an_error():
    with pytest.raises(ConfigError, match="trainer.lr: given twice"):
        parse_params(["trainer.lr=uniform:0.1:0.2", "trainer.lr=choice:0.1"])


def test_an_unknown_key_is_named_with_the_one_meant():
    with pytest.raises(ConfigError) as err:
        check_params(CONFIG, [], [parse_param("trainer.lrr=loguniform:1e-4:1e-2")])
    message = str(err.value)
    assert "--param trainer.lrr=" in message and "unknown key" in message
    assert "did you mean `trainer.lr`" in message


def test_a_value_the_key_refuses_is_an_error_before_any_trial():
    # trainer.lr must be > 0: the low end of the range is refused.
    with pytest.raises(ConfigError, match=r"--param trainer.lr=uniform:-1.0:1.0: with trainer.lr=-1.0"):
        check_params(CONFIG, [], [parse_param("trainer.lr=uniform:-1:1")])
    # A float range on an int key: the inner point is not an integer.
    with pytest.raises(ConfigError, match="model.base_channels"):
        check_params(CONFIG, [], [parse_param("model.base_channels=uniform:16:64")])
    # A choice value of the wrong type.
    with pytest.raises(ConfigError, match="trainer.lr_schedule"):
        check_params(CONFIG, [], [parse_param("trainer.lr_schedule=choice:cosine,linear")])
    # Good keys and values pass, with the sweep's own overrides applied first.
    check_params(
        CONFIG,
        ["trainer.max_steps=10"],
        [parse_param("trainer.lr=loguniform:1e-4:1e-2"), parse_param("model.base_channels=choice:16,32")],
    )


def test_the_sweep_file_is_typed_and_flags_go_on_top(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"config: {CONFIG}\n"
        "params:\n  trainer.lr: loguniform:1e-4:1e-2\n  model.base_channels: choice:32,64\n"
        "trials: 6\nconcurrent: 2\nscheduler: asha\nset: [trainer.max_steps=100]\n"
    )
    sweep = load_sweep_file(path, trials=None, metric="train/loss", set=["trainer.seed=1"])
    assert sweep.trials == 6 and sweep.concurrent == 2 and sweep.scheduler == "asha"
    assert sweep.metric == "train/loss"  # the flag given on the command line wins
    assert sweep.set == ["trainer.max_steps=100", "trainer.seed=1"]
    assert [s.key for s in parse_params(sweep.params)] == ["trainer.lr", "model.base_channels"]


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            "params: {trainer.lr: 'uniform:0.1:0.2'}\ntrails: 4\n",
            "trails: unknown key; did you mean `trials`?",
        ),
        ("params: {trainer.lr: 'uniform:0.1:0.2'}\nscheduler: hyperband\n", "scheduler"),
        ("params: {trainer.lr: 'uniform:0.1:0.2'}\nconcurrent: 0\n", "concurrent"),
        ("params: {}\n", "params: Value error, give at least one param"),
        ("params: {trainer.lr: 'uniform:0.1:0.2'}\nname: 'a b'\n", "name"),
    ],
)
def test_a_bad_sweep_file_names_the_key(tmp_path, body, expected):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"config: {CONFIG}\n{body}")
    with pytest.raises(ConfigError) as err:
        load_sweep_file(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_trial_names_come_from_tunes_trial_counter():
    assert trial_index("0fc30_00000") == 0
    assert trial_index("a1b2c_00012") == 12


def test_probes_bound_the_space():
    assert ParamSpec("k", "choice", (1, 2, 3)).probes() == [1, 2, 3]
    low, inner, high = ParamSpec("k", "loguniform", (1e-4, 1e-2)).probes()
    assert (low, high) == (1e-4, 1e-2) and low < inner < high
