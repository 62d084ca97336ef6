"""Editing through generate() and interpolate() (the model-level contract) on the diffusion
family, pixel space and KL latents: SDEdit image-to-image, RePaint inpainting, interpolation, and
the errors of every family and argument. Random weights: these are exactness properties, not quality.
"""

from __future__ import annotations

import pytest
import torch

from aigc.config import FAMILIES
from aigc.data.captions import digit_caption
from aigc.models import module_class
from aigc.models.base import DEFAULT_STRENGTH, EDIT_MODES, from_uint8, slerp, to_uint8
from aigc.models.diffusion import DiffusionModule
from aigc.models.gan import GANModule
from aigc.models.text import Tokenizer

CAPTIONS = [digit_caption(i % 10, f"k{i}") for i in range(60)]
ONE, SEVEN = digit_caption(1, "k1"), digit_caption(7, "k7")
# test_diffusion.py's tiny UNet; a 2x-downsampling KL autoencoder gives 8x8 pixels 4x4x4 latents
TINY = {
    "text": {"dim": 32, "layers": 1, "heads": 2, "max_tokens": 12},
    "base_channels": 16,
    "channel_mults": [1, 2],
    "heads": 2,
    "timesteps": 100,
    "sample_steps": 4,
}
AUTOENCODER = {
    "kind": "kl",
    "base_channels": 8,
    "channel_mults": [1, 2],
    "text": {"dim": 8, "layers": 0, "heads": 1},
}
LATENT = {
    "kind": "kl",
    "shape": [4, 4, 4],
    "dtype": "float32",
    "scale": 1.5,
    "autoencoder_model": AUTOENCODER,
}
#: the uint8 levels a latent model's strength-0 output may differ from the autoencoder round trip
#: computed outside generate (a batch of other size: float rounding before to_uint8's rounding)
LATENT_TOLERANCE = 1
#: interpolation: no step between neighbouring frames is larger than this multiple of the mean step
SMOOTHNESS = 3.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def _randomise(net: torch.nn.Module) -> None:
    """Give zero-initialised layers (output convs) weights, so every path changes the output."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _diffusion(latent: dict | None = None, **model) -> DiffusionModule:
    torch.manual_seed(0)
    module = DiffusionModule(
        model={**TINY, **model},
        tokenizer=Tokenizer.build(CAPTIONS).to_dict(),
        image_size=8,
        channels=1,
        latent=latent,
    )
    _randomise(module.ema_unet)
    if latent is not None:
        _randomise(module.autoencoder)
    return module.eval()


@pytest.fixture(scope="module")
def pixel() -> DiffusionModule:
    return _diffusion()


@pytest.fixture(scope="module")
def latent() -> DiffusionModule:
    return _diffusion(LATENT)


@pytest.fixture(scope="module", params=["pixel", "latent"])
def model(request: pytest.FixtureRequest) -> DiffusionModule:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def init(pixel: DiffusionModule) -> torch.Tensor:
    """Two uint8 input images (2, 1, 8, 8): samples of the pixel model, with a 0 and a 255 pixel."""
    images = pixel.generate([SEVEN], num_samples=2, seed=3)
    images[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    return images


def _mask() -> torch.Tensor:
    """One (1, 1, 8, 8) regenerate-mask: the 3x5 block at rows 2-4, columns 3-7 (odd edges, so a
    latent cell is partly masked)."""
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:5, 3:8] = True
    return mask


# ---------------------------------------------------------------------------------- the helpers
def test_from_uint8_inverts_to_uint8_for_every_level() -> None:
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(from_uint8(levels)), levels)
    assert from_uint8(levels).min() == -1 and from_uint8(levels).max() == 1


def test_slerp_ends_are_exact_and_the_middle_keeps_the_norm() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    out = slerp(a, b, [0.0, 0.5, 1.0])
    assert out.shape == (3, 4, 8, 8)
    assert torch.equal(out[0], a[0]) and torch.equal(out[2], b[0])
    # nearly orthogonal Gaussian vectors: the midpoint keeps their norm, a linear blend has ~0.71 of it
    assert float(out[1].norm() / a.norm()) == pytest.approx(float(b.norm() / a.norm()) ** 0.5, rel=0.05)
    assert torch.equal(slerp(a, a.clone(), [0.0, 0.3, 1.0])[1], a[0])  # parallel: the linear blend


# -------------------------------------------------------------------------------- image-to-image
def test_strength_0_returns_the_input_in_pixel_space(pixel: DiffusionModule, init: torch.Tensor) -> None:
    out = pixel.generate([ONE], num_samples=2, seed=5, init_images=init, strength=0.0)
    assert out.dtype == torch.uint8 and torch.equal(out, init)


def test_strength_0_returns_the_autoencoder_round_trip_for_a_latent_model(
    latent: DiffusionModule, init: torch.Tensor
) -> None:
    out = latent.generate([ONE], num_samples=2, seed=5, init_images=init, strength=0.0)
    ae = latent.autoencoder
    round_trip = to_uint8(ae.decode(ae.latents(from_uint8(init))).clamp(-1, 1))
    assert (out.int() - round_trip.int()).abs().max() <= LATENT_TOLERANCE
    assert not torch.equal(out, init)  # a random autoencoder: the round trip is not the input


@pytest.mark.parametrize(("sampler", "guidance"), [("ddim", 2.0), ("ddpm", 2.0), ("ddim", 1.0)])
def test_strength_1_is_text_to_image_with_the_same_seed(
    model: DiffusionModule, init: torch.Tensor, sampler: str, guidance: float
) -> None:
    options = {"sampler": sampler, "guidance": guidance}
    t2i = model.generate([ONE, SEVEN], num_samples=2, seed=11, **options)
    edited = model.generate(
        [ONE, SEVEN], num_samples=2, seed=11, init_images=init[:1], strength=1.0, **options
    )
    assert torch.equal(edited, t2i)


def test_strength_between_edits_the_input_deterministically(
    model: DiffusionModule, init: torch.Tensor
) -> None:
    kwargs = {"init_images": init, "strength": 0.5, "guidance": 2.0}
    out = model.generate([ONE], num_samples=2, seed=5, **kwargs)
    assert torch.equal(out, model.generate([ONE], num_samples=2, seed=5, **kwargs))
    assert not torch.equal(out, model.generate([ONE], num_samples=2, seed=6, **kwargs))
    assert not torch.equal(out, init)
    assert not torch.equal(out, model.generate([ONE], num_samples=2, seed=5, guidance=2.0))
    # the default strength, and the ddpm sampler (its step noise also from the seed)
    default = model.generate([ONE], num_samples=2, seed=5, init_images=init)
    assert torch.equal(
        default, model.generate([ONE], num_samples=2, seed=5, init_images=init, strength=DEFAULT_STRENGTH)
    )
    ddpm = {**kwargs, "sampler": "ddpm"}
    assert torch.equal(model.generate([ONE], 2, 5, **ddpm), model.generate([ONE], 2, 5, **ddpm))


def test_strength_moves_the_output_away_from_the_input(pixel: DiffusionModule, init: torch.Tensor) -> None:
    def distance(strength: float) -> float:
        out = pixel.generate([ONE], num_samples=2, seed=5, init_images=init, strength=strength, steps=10)
        return float((out.float() - init.float()).abs().mean())

    assert 0 == distance(0.0) < distance(0.3) < distance(1.0)


# ------------------------------------------------------------------------------------ inpainting
@pytest.mark.parametrize(("strength", "sampler", "guidance"), [(None, "ddim", 2.0), (0.6, "ddpm", 0.0)])
def test_inpainting_keeps_the_unmasked_pixels_exactly(
    model: DiffusionModule, init: torch.Tensor, strength: float | None, sampler: str, guidance: float
) -> None:
    mask = _mask()
    kwargs = {
        "init_images": init,
        "masks": mask,
        "strength": strength,
        "sampler": sampler,
        "guidance": guidance,
    }
    out = model.generate([ONE], num_samples=2, seed=5, **kwargs)
    keep, region = ~mask.expand_as(init), mask.expand_as(init)
    assert torch.equal(out[keep], init[keep])
    assert (out[region] != init[region]).float().mean() > 0.5  # the masked region is redrawn
    assert torch.equal(out, model.generate([ONE], num_samples=2, seed=5, **kwargs))  # deterministic


def test_inpainting_takes_a_mask_per_image_in_0_1_numbers(pixel: DiffusionModule, init: torch.Tensor) -> None:
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    masks[0, :, :4] = 1  # top half of the first image, nothing of the second
    out = pixel.generate([ONE], num_samples=2, seed=5, init_images=init, masks=masks)
    assert torch.equal(out[1], init[1]) and torch.equal(out[0, :, 4:], init[0, :, 4:])
    assert not torch.equal(out[0, :, :4], init[0, :, :4])
    as_float = pixel.generate([ONE], num_samples=2, seed=5, init_images=init, masks=masks.float())
    assert torch.equal(out, as_float)


def test_a_latent_model_regenerates_every_latent_cell_the_mask_touches(latent: DiffusionModule) -> None:
    cells = latent._edit_mask(_mask())  # (1, 1, 4, 4): pixel rows 2-4 -> latent rows 1-2, columns 3-7 -> 1-3
    expected = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    expected[..., 1:3, 1:4] = True
    assert torch.equal(cells, expected)


# --------------------------------------------------------------------------------- interpolation
def test_interpolation_ends_are_the_end_points_generated_alone(model: DiffusionModule) -> None:
    frames = model.interpolate(ONE, SEVEN, frames=5, seed=1, seed_b=2, guidance=2.0)
    assert frames.shape == (5, 1, 8, 8) and frames.dtype == torch.uint8
    assert torch.equal(frames[0], model.generate([ONE], seed=1, sampler="ddim", guidance=2.0)[0])
    assert torch.equal(frames[-1], model.generate([SEVEN], seed=2, sampler="ddim", guidance=2.0)[0])
    assert torch.equal(frames, model.interpolate(ONE, SEVEN, frames=5, seed=1, seed_b=2, guidance=2.0))


def test_interpolation_uses_ddim_whatever_the_config_says() -> None:
    module = _diffusion(sampler="ddpm")
    frames = module.interpolate(ONE, frames=2, seed=1, seed_b=2)  # one prompt, two seeds
    assert torch.equal(frames[0], module.generate([ONE], seed=1, sampler="ddim")[0])
    assert torch.equal(frames[1], module.generate([ONE], seed=2, sampler="ddim")[0])


@pytest.mark.parametrize(
    "ends",
    [
        {"prompt_b": SEVEN, "seed_b": 2},
        {"seed_b": 2},
        {"prompt_b": SEVEN},
        {"prompt_b": "seven"},  # fewer tokens than ONE: the masks are blended
        {"prompt_b": "", "seed_b": 2},
    ],
)
def test_neighbouring_frames_are_neighbours(model: DiffusionModule, ends: dict) -> None:
    """Measured in pixel space (the evaluator's features need a trained reference model). With these
    random UNets the largest step came to 1.2-1.8x the mean step (3.2x with a boolean union of token
    masks of different lengths, which jumps at the end frames)."""
    frames = model.interpolate(ONE, frames=8, seed=1, steps=10, guidance=3.0, **ends).float()
    steps = (frames[1:] - frames[:-1]).flatten(1).norm(dim=1)  # (7,)
    assert steps.mean() > 0
    assert steps.max() <= SMOOTHNESS * steps.mean(), steps.tolist()


def test_blended_token_masks_tend_to_each_ends_own_mask(pixel: DiffusionModule) -> None:
    from aigc.models.diffusion import _attention_bias, _blend_masks

    (_, ma, _), (_, mb, _) = pixel._encode([ONE], ema=True), pixel._encode(["seven"], ema=True)
    assert not torch.equal(ma, mb)
    w = torch.tensor([1e-12, 0.5, 1 - 1e-12])
    soft = _blend_masks(ma, mb, w, torch.float32)  # (3, T) logit biases
    assert torch.equal(soft[0].isfinite(), ma[0] | mb[0]) and soft.max() == 0
    assert torch.equal(soft[0] > -1, ma[0]) and torch.equal(soft[2] > -1, mb[0])
    assert torch.equal(_blend_masks(ma, ma, w, torch.float32), ma.expand(3, -1))  # equal masks: kept
    # the UNet's cross-attention takes such a float mask as a bias added to its logits: a bias of 0 /
    # -inf attends as the boolean mask does
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([50, 99])
    tokens, pooled = torch.randn(2, ma.shape[1], 32), torch.randn(2, 32)
    mask = torch.cat([ma, mb])
    as_bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    unet = pixel.ema_unet
    assert torch.equal(as_bias, _attention_bias(mask, torch.float32))
    assert torch.allclose(unet(x, t, tokens, mask, pooled), unet(x, t, tokens, as_bias, pooled), atol=1e-6)
    assert not torch.allclose(
        unet(x, t, tokens, mask, pooled), unet(x, t, tokens, torch.ones_like(mask), pooled)
    )


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_images": "INIT", "strength": 1.5}, r"strength must be in \[0, 1\], got 1.5"),
        ({"init_images": "INIT", "strength": -0.1}, r"strength must be in \[0, 1\]"),
        ({"masks": "MASK"}, "masks need init_images"),
        ({"strength": 0.5}, "strength needs init_images"),
        ({"init_images": "INIT_FLOAT"}, "init_images must be uint8 in \\[0, 255\\]"),
        ({"init_images": "INIT_RGB"}, r"init_images has shape \(2, 3, 8, 8\); expected \(2, 1, 8, 8\)"),
        ({"init_images": "INIT_3"}, r"init_images has shape \(3, 1, 8, 8\); expected \(2, 1, 8, 8\)"),
        (
            {"init_images": "INIT", "masks": "MASK_SMALL"},
            r"masks has shape \(1, 1, 4, 4\); expected \(2, 1, 8, 8\)",
        ),
        ({"init_images": "INIT", "masks": "MASK_255"}, "masks must be bool or hold only 0 and 1"),
        ({"init_images": "INIT", "colour": 1}, r"unknown option\(s\) \['colour'\].*allowed: steps"),
    ],
)
def test_bad_editing_arguments_are_errors_naming_them(
    pixel: DiffusionModule, init: torch.Tensor, kwargs: dict, message: str
) -> None:
    values = {
        "INIT": init,
        "INIT_FLOAT": from_uint8(init),
        "INIT_RGB": init.expand(2, 3, 8, 8),
        "INIT_3": torch.cat([init, init[:1]]),
        "MASK": _mask(),
        "MASK_SMALL": torch.ones(1, 1, 4, 4, dtype=torch.bool),
        "MASK_255": _mask().to(torch.uint8) * 255,
    }
    kwargs = {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        pixel.generate([ONE], num_samples=2, seed=0, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_b": SEVEN, "sampler": "ddpm"}, "sampler must be 'ddim'.*got 'ddpm'"),
        ({"prompt_b": SEVEN, "frames": 1}, "frames must be an integer >= 2, got 1"),
        ({}, "two different end points: give prompt_b and/or seed_b"),
        ({"seed_b": 2, "eta": 1.0}, r"unknown option\(s\) \['eta'\]"),
    ],
)
def test_bad_interpolation_arguments_are_errors_naming_them(
    pixel: DiffusionModule, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        pixel.interpolate(ONE, **kwargs)


def test_each_family_edits_as_listed_and_the_others_say_what_they_support(init: torch.Tensor) -> None:
    expected = {
        "diffusion": set(EDIT_MODES),
        "autoregressive": {"inpaint"},  # tests/unit/test_editing_ar.py
        "sd": set(EDIT_MODES),  # tests/unit/test_sd_edit.py
        "vae": {"img2img", "interpolate"},  # tests/unit/test_editing_vae_gan.py
        "gan": {"interpolate"},  # tests/unit/test_editing_vae_gan.py
    }
    for family in FAMILIES:
        modes = module_class(family).edit_modes
        assert modes <= set(EDIT_MODES)
        assert modes == expected.get(family, set()), family
    torch.manual_seed(0)
    gan = GANModule(
        model={
            "base_channels": 8,
            "latent_dim": 8,
            "cond_dim": 8,
            "text": {"dim": 16, "layers": 1, "heads": 2},
        },
        tokenizer=Tokenizer.build(CAPTIONS).to_dict(),
        image_size=8,
        channels=1,
    )
    only = "its editing operations: interpolate"
    with pytest.raises(ValueError, match=f"family 'gan' does not support img2img \\(init_images\\); {only}"):
        gan.generate([ONE], num_samples=2, init_images=init)
    with pytest.raises(ValueError, match=f"family 'gan' does not support inpaint \\(masks\\); {only}"):
        gan.generate([ONE], num_samples=2, init_images=init, masks=_mask())
    assert gan.generate([ONE], num_samples=2, seed=0).shape == (2, 1, 8, 8)  # text-to-image as before


def test_guided_frames_between_prompts_of_different_lengths_get_attention_biases_in_both_halves(
    pixel: DiffusionModule,
) -> None:
    """With guidance the conditional and unconditional rows go through the UNet in one batch: when
    the frames' masks are blended (floats), the empty prompt's mask must be a float bias too (a bool
    cast to float would read as biases 1 and 0, attending to its padding)."""
    empty_mask = pixel._encode([""], ema=True)[1][0]  # (T,)
    seen = []
    hook = pixel.ema_unet.register_forward_pre_hook(lambda net, args: seen.append(args[3].clone()))
    try:
        pixel.interpolate(ONE, "seven", frames=4, seed=1, steps=2, guidance=2.0)
    finally:
        hook.remove()
    floats = [m for m in seen if m.is_floating_point()]
    assert len(floats) == 2  # the middle frames' batch, once per step
    for mask in floats:  # (2 * 2 frames, T): conditional rows, then unconditional ones
        assert mask.max() == 0
        assert torch.equal(mask[2:].isfinite(), empty_mask.expand(2, -1))
