"""Inpainting through generate() on the autoregressive family, pixel tokens and VQ codes: the kept
tokens are forced while sampling in raster order. Random weights (moved off the initialisation, so
the logits depend on the context): these are exactness properties, not quality.
"""

from __future__ import annotations

import pytest
import torch
from test_autoregressive import CAPTIONS, TINY, make  # the tiny models of the family's tests

from aigc.models.autoregressive import AutoregressiveModule, dequantise, quantise
from aigc.models.base import EditRequest, from_uint8, make_generator, to_uint8
from aigc.models.text import Tokenizer

ONE, SEVEN = CAPTIONS[2], CAPTIONS[0]
#: a tiny VQ autoencoder (test_autoencoder.py's): 8x8 pixels -> 4x4 codes of a 16-code book
LATENT = {
    "kind": "vq",
    "shape": [4, 4],
    "dtype": "int16",
    "scale": None,
    "codebook_size": 16,
    "autoencoder_model": {
        "kind": "vq",
        "base_channels": 8,
        "channel_mults": [1, 2],
        "codebook_size": 16,
        "text": {"dim": 8, "layers": 0, "heads": 1},
    },
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def _moved(m: AutoregressiveModule, scale: float = 0.3) -> AutoregressiveModule:
    """Move the GPT off its initialisation: at init its logits hardly depend on earlier tokens (a
    different known half changed under 1 % of the sampled tokens), at 0.3 they do (about half)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.gpt.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m.eval()


def _vq_model() -> AutoregressiveModule:
    torch.manual_seed(0)
    m = AutoregressiveModule(TINY, Tokenizer.build(CAPTIONS).to_dict(), 8, 1, latent=LATENT)
    with torch.no_grad():  # spread the codebook so that different pixels get different codes
        m.autoencoder.quantizer.codebook.mul_(10.0)
    return _moved(m)


@pytest.fixture(scope="module")
def grey() -> AutoregressiveModule:
    return _moved(make(8, 1))


@pytest.fixture(scope="module")
def rgb() -> AutoregressiveModule:
    return _moved(make(8, 3))


@pytest.fixture(scope="module")
def vq() -> AutoregressiveModule:
    return _vq_model()


@pytest.fixture(scope="module", params=["grey", "rgb", "vq"])
def model(request: pytest.FixtureRequest) -> AutoregressiveModule:
    return request.getfixturevalue(request.param)


def _init(m: AutoregressiveModule, n: int = 2, seed: int = 3) -> torch.Tensor:
    """uint8 inputs ``(n, C, 8, 8)``: the model's own samples (for a pixel model on its levels, so a
    redrawn pixel that differs from the input is a new token, not the quantisation)."""
    return m.generate([SEVEN], num_samples=n, seed=seed)


def _rows(lo: int, hi: int) -> torch.Tensor:
    """A (1, 1, 8, 8) regenerate-mask of the pixel rows lo..hi-1."""
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., lo:hi, :] = True
    return mask


def _block() -> torch.Tensor:
    """The 3x5 block at rows 2-4, columns 3-7 (odd edges: a VQ code cell is partly masked)."""
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:5, 3:8] = True
    return mask


# ---------------------------------------------------------------------------- the edge masks
@pytest.mark.parametrize("options", [{"guidance": 1.0}, {"guidance": 2.0, "temperature": 0.8, "top_k": 5}])
def test_an_all_ones_mask_is_text_to_image_with_the_same_seed(
    model: AutoregressiveModule, options: dict
) -> None:
    t2i = model.generate([ONE, SEVEN], num_samples=2, seed=11, **options)
    init = _init(model, 1)
    ones = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    edited = model.generate([ONE, SEVEN], num_samples=2, seed=11, init_images=init, masks=ones, **options)
    assert torch.equal(edited, t2i)


def test_an_all_zeros_mask_returns_the_input(model: AutoregressiveModule) -> None:
    init = _init(model)
    init[0, :, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)[None]  # off the levels for levels != 256
    zeros = torch.zeros(2, 1, 8, 8)
    out = model.generate([ONE], num_samples=2, seed=5, init_images=init, masks=zeros, guidance=2.0)
    assert out.dtype == torch.uint8 and torch.equal(out, init)


# ---------------------------------------------------------------------------- partial masks
@pytest.mark.parametrize("region", ["top", "bottom", "block"])
def test_inpainting_keeps_the_unmasked_pixels_and_redraws_the_masked_ones(
    model: AutoregressiveModule, region: str
) -> None:
    mask = {"top": _rows(0, 4), "bottom": _rows(4, 8), "block": _block()}[region]
    init = _init(model)
    kwargs = {"init_images": init, "masks": mask, "guidance": 2.0}
    out = model.generate([ONE], num_samples=2, seed=5, **kwargs)
    keep, redraw = ~mask.expand_as(init), mask.expand_as(init)
    assert torch.equal(out[keep], init[keep])
    assert (out[redraw] != init[redraw]).float().mean() > 0.3
    assert torch.equal(out, model.generate([ONE], num_samples=2, seed=5, **kwargs))  # deterministic
    assert not torch.equal(out, model.generate([ONE], num_samples=2, seed=6, **kwargs))


@pytest.mark.parametrize("fixture", ["grey", "rgb"])
def test_the_kept_pixel_tokens_are_the_quantised_input_before_the_paste(
    request: pytest.FixtureRequest, fixture: str
) -> None:
    """``_generate``'s own output, before generate() pastes the kept pixels back: a mask mapped to
    the wrong tokens (e.g. channels not interleaved as quantise orders them) would show here."""
    m = request.getfixturevalue(fixture)
    c = m.channels
    x = from_uint8(torch.randint(0, 256, (2, c, 8, 8), generator=torch.Generator().manual_seed(0)))
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[0, :, 1:6, 2:5] = True
    mask[1, :, ::2, 1::3] = True
    with torch.no_grad():
        out = m._generate([ONE, SEVEN], make_generator(5, m.device), edit=EditRequest(x, 1.0, mask))
    quantised = dequantise(quantise(x, m.levels), m.levels, c, 8)
    keep = ~mask.expand(2, c, 8, 8)
    assert torch.equal(out[keep], quantised[keep])
    assert (out[~keep] != quantised[~keep]).float().mean() > 0.3
    tokens, kept = m._edit_tokens(EditRequest(x, 1.0, mask))
    assert torch.equal(tokens, quantise(x, m.levels))
    assert torch.equal(kept.view(2, 8, 8, c).permute(0, 3, 1, 2), keep)  # raster, channels interleaved


def test_the_known_tokens_condition_the_sampled_ones_after_them(grey: AutoregressiveModule) -> None:
    init = _init(grey, 4)
    other = init.clone()
    other[:, :, :4] = 255 - other[:, :, :4]  # another known top half
    kwargs = {"masks": _rows(4, 8), "guidance": 2.0}
    a = grey.generate([ONE], num_samples=4, seed=5, init_images=init, **kwargs)
    b = grey.generate([ONE], num_samples=4, seed=5, init_images=other, **kwargs)
    assert (a[:, :, 4:] != b[:, :, 4:]).float().mean() > 0.1  # same seed, other context


def test_the_sampled_tokens_do_not_see_the_known_ones_after_them(grey: AutoregressiveModule) -> None:
    """The raster order's limit: a masked top half is drawn before the known bottom half."""
    init = _init(grey, 4)
    other = init.clone()
    other[:, :, 4:] = 255 - other[:, :, 4:]
    kwargs = {"masks": _rows(0, 4), "guidance": 2.0}
    a = grey.generate([ONE], num_samples=4, seed=5, init_images=init, **kwargs)
    b = grey.generate([ONE], num_samples=4, seed=5, init_images=other, **kwargs)
    assert torch.equal(a[:, :, :4], b[:, :, :4])
    assert torch.equal(b[:, :, 4:], other[:, :, 4:])


def test_guided_sampling_feeds_the_known_tokens_to_both_halves_and_stops_after_the_last_masked(
    rgb: AutoregressiveModule,
) -> None:
    x = from_uint8(_init(rgb))
    mask = _rows(2, 5).expand(2, 1, 8, 8)
    tokens, kept = rgb._edit_tokens(EditRequest(x, 1.0, mask))
    fed = []
    hook = rgb.gpt.register_forward_pre_hook(lambda net, args: fed.append(args[0].clone()))
    try:
        with torch.no_grad():
            out = rgb._sample_tokens(
                [ONE, SEVEN], make_generator(5, rgb.device), 1.0, None, 2.0, (tokens, kept)
            )
    finally:
        hook.remove()
    last = 5 * 8 * 3 - 1  # the last token of pixel row 4
    assert len(fed) == 1 + last  # the start token, then every token before the last masked one
    steps = torch.cat(fed[1:], dim=1)  # (2 + 2, last): conditional rows, then unconditional ones
    assert torch.equal(steps[:2], steps[2:])  # both halves of the guided batch see the same tokens
    assert torch.equal(steps[:2], out[:, :last])
    assert torch.equal(out[kept], tokens[kept])
    assert torch.equal(out[:, last + 1 :], tokens[:, last + 1 :])  # after the last masked: the input


# ---------------------------------------------------------------------------------- VQ codes
def test_a_vq_model_forces_the_input_codes_of_the_cells_the_mask_leaves(vq: AutoregressiveModule) -> None:
    x = from_uint8(_init(vq))
    mask = _block().expand(2, 1, 8, 8)
    tokens, kept = vq._edit_tokens(EditRequest(x, 1.0, mask))
    codes = vq.autoencoder.tokens(x)  # (2, 4, 4)
    assert torch.equal(tokens, codes.reshape(2, 16))
    assert len(codes.unique()) > 2  # the codes differ over the image
    cells = torch.zeros(4, 4, dtype=torch.bool)  # pixel rows 2-4 -> code rows 1-2, columns 3-7 -> 1-3
    cells[1:3, 1:4] = True
    assert torch.equal(kept, ~cells.flatten().expand(2, 16))
    zeros = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    with torch.no_grad():
        out = vq._sample_tokens([ONE, SEVEN], make_generator(5, vq.device), 1.0, None, 2.0, (tokens, kept))
        # before the paste, an all-zeros mask decodes the input's codes
        decoded = vq._generate([ONE, SEVEN], make_generator(5, vq.device), edit=EditRequest(x, 1.0, zeros))
    assert torch.equal(out[kept], tokens[kept])
    assert not torch.equal(out[~kept], tokens[~kept])
    assert torch.equal(to_uint8(decoded), to_uint8(vq.decode_latents(codes)))


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("strength", [0.5, 0.0])
def test_a_strength_other_than_1_is_an_error(grey: AutoregressiveModule, strength: float) -> None:
    init = _init(grey)
    with pytest.raises(
        ValueError, match=rf"family 'autoregressive' .*strength has no meaning.*got {strength}$"
    ):
        grey.generate([ONE], num_samples=2, seed=0, init_images=init, masks=_rows(0, 4), strength=strength)
    same = grey.generate([ONE], num_samples=2, seed=0, init_images=init, masks=_rows(0, 4), strength=1.0)
    assert torch.equal(same, grey.generate([ONE], num_samples=2, seed=0, init_images=init, masks=_rows(0, 4)))


def test_image_to_image_and_interpolation_are_errors_naming_inpaint(grey: AutoregressiveModule) -> None:
    assert grey.edit_modes == {"inpaint"}
    init = _init(grey)
    supported = "its editing operations: inpaint$"
    with pytest.raises(
        ValueError, match=rf"family 'autoregressive' does not support img2img .*; {supported}"
    ):
        grey.generate([ONE], num_samples=2, seed=0, init_images=init)
    with pytest.raises(ValueError, match=rf"family 'autoregressive' does not support img2img .*{supported}"):
        grey._generate([ONE], make_generator(0, grey.device), edit=EditRequest(from_uint8(init[:1]), 0.6))
    with pytest.raises(
        ValueError, match=rf"family 'autoregressive' does not support interpolate .*; {supported}"
    ):
        grey.interpolate(ONE, SEVEN)
