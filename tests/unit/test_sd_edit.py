"""Editing with the ``sd`` family (aigc.models.sd) through generate() and interpolate(): SDEdit
image-to-image (checked against diffusers' StableDiffusionImg2ImgPipeline), RePaint inpainting in
latent space and interpolation. Tiny random-weight pipelines (tests/sd_pipeline.py): these are
exactness properties, not quality.
"""

from __future__ import annotations

import pytest
import torch

from aigc.models.base import from_uint8, to_uint8
from sd_pipeline import IMAGE_SIZE, build_tiny_pipeline

PROMPTS = ["a red square", "a blue circle"]
#: sampling options of every call: few steps keep the module fast, guidance > 1 runs both halves
FAST = {"steps": 4, "guidance": 3.0}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """Tiny pipelines: epsilon with DDIM (deterministic), v-prediction with DDPM (draws noise at
    every step), epsilon with Euler (a sigma-space scheduler that keeps a step index)."""
    root = tmp_path_factory.mktemp("sd-edit")
    return {
        "ddim": build_tiny_pipeline(root / "ddim", prediction_type="epsilon", scheduler="DDIMScheduler"),
        "ddpm": build_tiny_pipeline(root / "ddpm", prediction_type="v_prediction", scheduler="DDPMScheduler"),
        "euler": build_tiny_pipeline(root / "euler", scheduler="EulerDiscreteScheduler"),
    }


def make_module(pipeline, channels: int = 3):
    from aigc.models import module_class
    from aigc.models.text import Tokenizer

    return module_class("sd")(
        model={"pipeline": str(pipeline)},
        tokenizer=Tokenizer.build(PROMPTS).to_dict(),
        image_size=IMAGE_SIZE,
        channels=channels,
    ).eval()


@pytest.fixture(scope="module")
def modules(pipes):
    return {name: make_module(folder) for name, folder in pipes.items()}


@pytest.fixture(scope="module", params=["ddim", "ddpm", "euler"])
def module(request, modules):
    return modules[request.param]


@pytest.fixture(scope="module")
def init(modules) -> torch.Tensor:
    """Two uint8 input images (2, 3, 16, 16): text-to-image samples of the DDIM pipeline."""
    return modules["ddim"].generate(PROMPTS, seed=3, **FAST)


def _mask() -> torch.Tensor:
    """One (1, 1, 16, 16) regenerate-mask: rows 3-8, columns 5-13 (odd edges: on the 8x8 latent grid
    the cells of rows 1-4 and columns 2-6 each see some of it)."""
    mask = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    mask[..., 3:9, 5:14] = True
    return mask


def _reconstruction(module, images: torch.Tensor) -> torch.Tensor:
    """The VAE round trip of uint8 images: decode(posterior mean), as uint8."""
    x = from_uint8(images)
    if module.channels == 1:
        x = x.expand(-1, 3, -1, -1)
    with torch.no_grad():
        decoded = module.vae.decode(module.vae.encode(x).latent_dist.mean).sample
    if module.channels == 1:
        decoded = decoded.mean(1, keepdim=True)
    return to_uint8(decoded.clamp(-1, 1))


# -------------------------------------------------------------------------------- image-to-image
def test_strength_0_returns_the_vae_reconstruction_of_the_input(modules, init) -> None:
    module = modules["ddpm"]
    out = module.generate(PROMPTS, seed=5, init_images=init, strength=0.0, **FAST)
    # scaled by scaling_factor and back: float rounding may move a level
    assert (out.int() - _reconstruction(module, init).int()).abs().max() <= 1
    assert not torch.equal(out, init)  # a random VAE: the round trip is not the input


@pytest.mark.parametrize("guidance", [3.0, 1.0, 0.0])
def test_strength_1_is_text_to_image_with_the_same_seed(module, init, guidance: float) -> None:
    options = {"steps": 4, "guidance": guidance}
    t2i = module.generate(PROMPTS, num_samples=2, seed=11, **options)
    edited = module.generate(PROMPTS, num_samples=2, seed=11, init_images=init[:1], strength=1.0, **options)
    assert torch.equal(edited, t2i)


def test_strength_between_edits_the_input_deterministically(module, init) -> None:
    kwargs = {"init_images": init, "strength": 0.5, **FAST}
    out = module.generate(PROMPTS, seed=5, **kwargs)
    assert torch.equal(out, module.generate(PROMPTS, seed=5, **kwargs))
    assert not torch.equal(out, module.generate(PROMPTS, seed=6, **kwargs))
    assert not torch.equal(out, module.generate(PROMPTS, seed=5, **FAST))  # not text-to-image
    assert not torch.equal(out, module.generate(PROMPTS, seed=5, **{**kwargs, "strength": 0.0}))


def test_a_grey_model_edits_its_images_repeated_to_rgb(pipes) -> None:
    grey = make_module(pipes["ddim"], channels=1)
    init = grey.generate(PROMPTS, seed=3, **FAST)
    assert init.shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)
    out = grey.generate(PROMPTS, seed=5, init_images=init, strength=0.0, **FAST)
    assert (out.int() - _reconstruction(grey, init).int()).abs().max() <= 1
    assert torch.equal(
        grey.generate(PROMPTS, seed=5, init_images=init, strength=1.0, **FAST),
        grey.generate(PROMPTS, seed=5, **FAST),
    )
    mask = _mask()
    inpainted = grey.generate(PROMPTS, seed=5, init_images=init, masks=mask, **FAST)
    keep = ~mask.expand_as(init)
    assert torch.equal(inpainted[keep], init[keep]) and not torch.equal(inpainted, init)


@pytest.mark.parametrize(("name", "strength"), [("ddpm", 0.5), ("ddim", 0.8)])
def test_img2img_equals_diffusers_img2img_given_the_posterior_mean(
    pipes, modules, init, name: str, strength: float
) -> None:
    """StableDiffusionImg2ImgPipeline given 4-channel latents takes them as they are and draws its
    noise first; given the pixel image it would first draw a posterior sample from the generator."""
    from diffusers import StableDiffusionImg2ImgPipeline

    module = modules[name]
    ours = module.generate(PROMPTS, num_samples=2, seed=5, init_images=init[:1], strength=strength, **FAST)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        pipes[name], safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        posterior = pipe.vae.encode(from_uint8(init[:1]).expand(4, -1, -1, -1)).latent_dist
    theirs = pipe(
        PROMPTS,
        image=posterior.mean * pipe.vae.config.scaling_factor,
        strength=strength,
        num_images_per_prompt=2,
        num_inference_steps=FAST["steps"],
        guidance_scale=FAST["guidance"],
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).images  # (4, 3, H, W) in [0, 1]
    theirs = (theirs * 255).round().to(torch.uint8)
    assert ours.shape == theirs.shape
    assert (ours.int() - theirs.int()).abs().max() <= 1  # uint8 rounding of the same floats
    assert ours.float().std() > 5


# ------------------------------------------------------------------------------------ inpainting
@pytest.mark.parametrize("strength", [None, 0.5])
def test_inpainting_keeps_the_unmasked_pixels_exactly(module, init, strength: float | None) -> None:
    mask = _mask()
    kwargs = {"init_images": init, "masks": mask, "strength": strength, **FAST}
    out = module.generate(PROMPTS, seed=5, **kwargs)
    keep, region = ~mask.expand_as(init), mask.expand_as(init)
    assert torch.equal(out[keep], init[keep])
    assert (out[region] != init[region]).float().mean() > 0.5  # the masked region is redrawn
    assert torch.equal(out, module.generate(PROMPTS, seed=5, **kwargs))  # deterministic
    assert not torch.equal(out, module.generate(PROMPTS, seed=6, **kwargs))


def test_inpainting_regenerates_every_latent_cell_the_mask_touches(modules) -> None:
    cells = modules["ddim"]._edit_mask(_mask())  # (1, 1, 8, 8)
    expected = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    expected[..., 1:5, 2:7] = True
    assert torch.equal(cells, expected)


def test_inpainting_keeps_the_known_latents_while_sampling(modules, init) -> None:
    """The latents the VAE decodes are the input's own outside the regenerated cells (RePaint's last
    re-imposition), not only the pixels base.generate pastes back."""
    module = modules["ddim"]
    decoded = []
    hook = module.vae.post_quant_conv.register_forward_pre_hook(
        lambda net, args: decoded.append(args[0].clone())
    )
    try:
        module.generate(PROMPTS, seed=5, init_images=init, masks=_mask(), **FAST)
    finally:
        hook.remove()
    known = module._edit_latents(from_uint8(init)) / module.vae.config.scaling_factor
    keep = ~module._edit_mask(_mask()).expand_as(known)
    assert torch.allclose(decoded[0][keep], known[keep], atol=1e-6)
    assert not torch.allclose(decoded[0][~keep], known[~keep], atol=1e-2)


# --------------------------------------------------------------------------------- interpolation
def test_interpolation_ends_are_the_end_points_generated_alone(modules) -> None:
    module = modules["euler"]
    a, b = PROMPTS
    frames = module.interpolate(a, b, frames=4, seed=1, seed_b=2, **FAST)
    assert frames.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and frames.dtype == torch.uint8
    assert torch.equal(frames[0], module.generate([a], seed=1, **FAST)[0])
    assert torch.equal(frames[-1], module.generate([b], seed=2, **FAST)[0])
    assert torch.equal(frames, module.interpolate(a, b, frames=4, seed=1, seed_b=2, **FAST))
    for i in (1, 2):  # the frames between are new images, each different
        assert not any(torch.equal(frames[i], frames[j]) for j in range(4) if j != i)


@pytest.mark.parametrize("ends", [{"prompt_b": PROMPTS[1]}, {"seed_b": 2}, {"prompt_b": "", "seed_b": 2}])
def test_neighbouring_frames_are_neighbours(modules, ends: dict) -> None:
    frames = modules["ddim"].interpolate(PROMPTS[0], frames=6, seed=1, **FAST, **ends).float()
    steps = (frames[1:] - frames[:-1]).flatten(1).norm(dim=1)  # (5,)
    assert steps.min() > 0
    assert steps.max() <= 3 * steps.mean(), steps.tolist()


def test_a_stochastic_scheduler_interpolates_with_ddim_of_its_config(modules) -> None:
    module = modules["ddpm"]
    frames = module.interpolate(PROMPTS[0], frames=3, seed=1, seed_b=2, **FAST)
    assert torch.equal(frames, module.interpolate(PROMPTS[0], frames=3, seed=1, seed_b=2, **FAST))
    config = module.scheduler_config
    ddpm_first = module.generate([PROMPTS[0]], seed=1, **FAST)[0]
    module.scheduler_config = {**config, "_class_name": "DDIMScheduler"}
    try:
        assert torch.equal(frames[0], module.generate([PROMPTS[0]], seed=1, **FAST)[0])
        assert torch.equal(frames[-1], module.generate([PROMPTS[0]], seed=2, **FAST)[0])
    finally:
        module.scheduler_config = config
    assert not torch.equal(frames[0], ddpm_first)


def test_a_scheduler_that_draws_noise_while_interpolating_is_an_error(modules, monkeypatch) -> None:
    monkeypatch.setattr("aigc.models.sd.STOCHASTIC_SCHEDULERS", frozenset())  # DDPM taken as it is
    with pytest.raises(ValueError, match="deterministic sampler.*'DDPMScheduler' draws noise"):
        modules["ddpm"].interpolate(PROMPTS[0], frames=2, seed=1, seed_b=2, **FAST)


def test_the_sd_family_lists_its_editing_modes(modules) -> None:
    assert modules["ddim"].edit_modes == {"img2img", "inpaint", "interpolate"}
    with pytest.raises(ValueError, match="frames must be an integer >= 2"):
        modules["ddim"].interpolate(PROMPTS[0], PROMPTS[1], frames=1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sampler'\]"):
        modules["ddim"].interpolate(PROMPTS[0], PROMPTS[1], sampler="ddim")
