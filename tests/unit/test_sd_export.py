"""``aigc export REF OUT [--diffusers] [--merge]`` (aigc.workflows.export): a trained model written as an
aigc export folder or, for the sd family, in the diffusers layout that diffusers itself loads and samples
the same images from.

REF here is an aigc export folder or a ``.ckpt``; a registered version goes through the same resolver
(aigc.workflows.model_ref), and tests/integration/test_sd_train.py exports one. Pipelines are the tiny
random-weight ones of tests/sd_pipeline.py: offline, fast.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from aigc.cli import app
from sd_pipeline import IMAGE_SIZE, build_tiny_pipeline, folder_bytes

PROMPTS = ["a red square", "a blue circle"]
STEPS, GUIDANCE = 3, 3.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "eps", scheduler="DDIMScheduler")


def make_module(pipeline, **model):
    from aigc.models import module_class
    from aigc.models.text import Tokenizer

    module = module_class("sd")(
        model={"pipeline": str(pipeline), **model},
        tokenizer=Tokenizer.build(PROMPTS).to_dict(),
        image_size=IMAGE_SIZE,
        channels=3,
    )
    g = torch.Generator().manual_seed(0)  # off the start: a LoRA adapter starts as the identity
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def ours(module) -> torch.Tensor:
    return module.generate(PROMPTS, num_samples=2, seed=3, steps=STEPS, guidance=GUIDANCE)


def theirs(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    return (images * 255).round().to(torch.uint8)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a.int() - b.int()).abs().max() <= 1  # uint8 rounding of the same floats
    assert a.float().std() > 5  # not blank


def export(*args: str):
    result = CliRunner().invoke(app, ["export", *map(str, args)])
    return result


def test_a_lora_model_exports_as_its_adapter_merged_pipeline_or_merged_aigc_export(pipe_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    from aigc.models.export import export_model, load_export
    from aigc.models.sd import BASE_FILE

    module = make_module(pipe_folder, lora={"rank": 4, "alpha": 8.0})
    expected = ours(module)
    ref = export_model(module, tmp_path / "trained")  # what `aigc register` logs, and the CLI reads

    # --diffusers: the adapter alone, which diffusers loads onto the base pipeline.
    r = export(ref, tmp_path / "adapter", "--diffusers")
    assert r.exit_code == 0, r.output
    assert "diffusers LoRA adapter" in r.output
    adapter = tmp_path / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"pytorch_lora_weights.safetensors", BASE_FILE}
    assert json.loads((adapter / BASE_FILE).read_text())["pipeline"] == str(pipe_folder)
    pipe = StableDiffusionPipeline.from_pretrained(pipe_folder)
    pipe.load_lora_weights(adapter)
    assert_same(expected, theirs(pipe))

    # --diffusers --merge: a whole pipeline folder, no adapter layers left.
    r = export(ref, tmp_path / "merged", "--diffusers", "--merge")
    assert r.exit_code == 0, r.output
    assert "diffusers pipeline folder (LoRA merged)" in r.output
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in pipe.unet.state_dict())
    assert_same(expected, theirs(pipe))

    # --merge alone: an aigc export of the merged model (model.lora unset, the whole UNet's weights).
    r = export(ref, tmp_path / "merged-aigc", "--merge")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "merged-aigc" / "config.json").read_text())
    assert config["family"] == "sd" and config["model"]["lora"] is None
    merged = load_export(tmp_path / "merged-aigc")
    assert not any("lora" in k for k in merged.state_dict())
    assert_same(expected, ours(merged))

    # An existing folder is refused, --overwrite replaces it.
    r = export(ref, tmp_path / "adapter", "--diffusers")
    assert r.exit_code == 2 and "already exists; pass --overwrite" in r.output
    r = export(ref, tmp_path / "adapter", "--diffusers", "--merge", "--overwrite")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "adapter" / "model_index.json").is_file()


def test_a_fully_fine_tuned_checkpoint_exports_as_a_pipeline_and_merge_is_refused(pipe_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    module = make_module(pipe_folder)
    expected = ours(module)
    # A checkpoint as training writes it: hyperparameters and the state without the frozen parts.
    ckpt = tmp_path / "full.ckpt"
    state = {k: v for k, v in module.state_dict().items() if k not in module.base_weight_keys()}
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams)}, ckpt)

    r = export(ckpt, tmp_path / "pipe", "--diffusers")
    assert r.exit_code == 0, r.output
    assert "diffusers pipeline folder of a sd model" in r.output
    assert folder_bytes(tmp_path / "pipe") == pytest.approx(folder_bytes(pipe_folder), rel=0.01)
    assert_same(expected, theirs(StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")))

    r = export(ckpt, tmp_path / "merged", "--diffusers", "--merge")
    assert r.exit_code == 2
    assert "has no LoRA adapters (its model.lora is not set): there is nothing to --merge" in r.output
    assert not (tmp_path / "merged").exists()


def test_diffusers_layout_of_another_family_is_refused_naming_it(tmp_path):
    from aigc.config import load_config
    from aigc.models import build_module
    from aigc.models.export import export_model
    from aigc.models.text import Tokenizer
    from tiny import TINY

    cfg = load_config(None, ["model.family=diffusion", *TINY["diffusion"]])
    module = build_module(cfg, Tokenizer.build(PROMPTS), image_size=8, channels=1)
    ref = export_model(module, tmp_path / "diffusion")
    r = export(ref, tmp_path / "out", "--diffusers")
    assert r.exit_code == 2
    assert "is a diffusion model: --diffusers writes the diffusers layout of the sd family" in r.output
    assert not (tmp_path / "out").exists()
    # Without --diffusers, any family: the aigc export folder.
    r = export(ref, tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "aigc export folder of a diffusion model, 3 files" in r.output
