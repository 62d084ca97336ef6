"""The registry's pure rules: model references, the gate's comparison, the pyfunc's params."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from aigc.registry.gate import Figures, GateConfig, compare, measured_alike
from aigc.registry.pyfunc import generate_params, png_base64, prompts_of
from aigc.registry.versions import ModelRef, RegistryError, model_name, parse_ref

PROV = {"evaluator_hash": "abc", "data_version": "d1", "num_samples": "500", "seed": "0"}


def test_references_by_alias_version_and_uri() -> None:
    assert parse_ref("aigc-diffusion@production") == ModelRef("aigc-diffusion", "production", None)
    assert parse_ref("models:/aigc-gan@candidate") == ModelRef("aigc-gan", "candidate", None)
    assert parse_ref("aigc-vae/3") == ModelRef("aigc-vae", None, "3")
    assert parse_ref("aigc-vae") == ModelRef("aigc-vae", "production", None)
    assert str(parse_ref("aigc-vae/3")) == "aigc-vae/3" and model_name("gan") == "aigc-gan"
    with pytest.raises(RegistryError, match="NAME@ALIAS"):
        parse_ref("aigc diffusion@@x")


def test_the_gate_needs_fd_lower_by_the_margin_and_accuracy_within_tolerance() -> None:
    gate = GateConfig(fd_margin=0.1, accuracy_tolerance=0.01)
    prod = Figures("1", {"eval/fd": 2.0, "eval/cond_accuracy": 0.95}, PROV)

    def verdict(fd: float, acc: float) -> bool:
        return compare(Figures("2", {"eval/fd": fd, "eval/cond_accuracy": acc}, PROV), prod, gate)[0]

    assert verdict(1.85, 0.95)  # 0.15 better, accuracy equal
    assert not verdict(1.95, 0.99)  # better, but not by more than the margin
    assert not verdict(1.0, 0.93)  # much better FD, accuracy dropped by more than the tolerance
    assert verdict(1.0, 0.945)  # accuracy within the tolerance
    ok, checks = compare(Figures("2", {"eval/fd": 1.5}, PROV), prod, gate)
    assert ok and len(checks) == 1  # no labels on one side: FD alone decides
    assert not compare(Figures("2", {}, PROV), prod, gate)[0]


def test_figures_are_comparable_only_when_all_provenance_matches() -> None:
    a = Figures("1", {}, PROV)
    assert measured_alike(a, Figures("2", {}, dict(PROV)))
    assert not measured_alike(a, Figures("2", {}, PROV | {"num_samples": "100"}))
    assert not measured_alike(Figures("1", {}, {"seed": "0"}), Figures("2", {}, {"seed": "0"}))


def test_pyfunc_params_and_prompts() -> None:
    options = {"steps": int, "guidance": float, "sampler": str}
    n, seed, opts = generate_params({"num_samples": 3, "seed": -1, "steps": 7.0, "guidance": None}, options)
    assert (n, seed, opts) == (3, None, {"steps": 7})  # -1: random; None keeps the model's default
    assert generate_params({"seed": 5, "unknown": 1}, options) == (1, 5, {})
    import pandas as pd

    assert prompts_of(pd.DataFrame({"prompt": ["a", None]})) == ["a", ""]
    assert prompts_of([{"prompt": "x"}, "y"]) == ["x", "y"]
    with pytest.raises(ValueError, match="'prompt' column"):
        prompts_of(pd.DataFrame({"text": ["a"]}))


def test_png_round_trip_grey_and_rgb() -> None:
    for c in (1, 3):
        img = torch.randint(0, 256, (c, 5, 7), dtype=torch.uint8)
        with Image.open(io.BytesIO(base64.b64decode(png_base64(img)))) as back:
            arr = torch.from_numpy(__import__("numpy").asarray(back).copy())
        arr = arr[None] if c == 1 else arr.permute(2, 0, 1)
        assert torch.equal(arr, img)
