"""``aigc generate`` with edits (``--init-image``, ``--strength``, ``--mask``, ``--interpolate``) and
the MLflow pyfunc's edit params, on a tiny diffusion export with random weights (CliRunner, no
registry: ``--model`` takes an export folder). The model-level properties are
tests/unit/test_editing.py's; these check that files and params reach ``generate()`` and
``interpolate()`` intact and that mistakes are clear errors.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from aigc.cli import app
from tiny import TINY

PROMPTS = ["the digit 1", "the digit 7", "a handwritten seven", "one"]
SIZE = 8
#: image_grid's cells: 8 px images upscaled to 32 (min_cell), 1 px of padding
SCALE, PAD = 4, 1


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def _export(family: str, folder):
    from aigc.config import load_config
    from aigc.models import build_module
    from aigc.models.export import export_model
    from aigc.models.text import Tokenizer

    torch.manual_seed(0)
    cfg = load_config(None, [f"model.family={family}", *TINY[family]])
    module = build_module(cfg, Tokenizer.build(PROMPTS), image_size=SIZE, channels=1)
    with torch.no_grad():  # zero-initialised output layers: give them weights, so edits change pixels
        g = torch.Generator().manual_seed(0)
        for p in module.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return export_model(module, folder)


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory):
    return _export("diffusion", tmp_path_factory.mktemp("diffusion") / "export")


def generate(*args) -> object:
    return CliRunner().invoke(app, ["generate", *map(str, args)])


def write_png(path, arr: np.ndarray):
    Image.fromarray(arr).save(path)
    return path


def cells(path, n: int) -> list[np.ndarray]:
    """The first ``n`` cells of a grid image_grid wrote, back at the model's size (grey)."""
    with Image.open(path) as grid:
        arr = np.asarray(grid.convert("L"))
    ncol = (grid.width - PAD) // (SIZE * SCALE + PAD)
    out = []
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = PAD + r * (SIZE * SCALE + PAD), PAD + c * (SIZE * SCALE + PAD)
        out.append(arr[y : y + SIZE * SCALE : SCALE, x : x + SIZE * SCALE : SCALE])
    return out


def test_init_image_at_strength_0_mask_and_interpolate_through_the_cli(diffusion, tmp_path):
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    init = write_png(tmp_path / "init.png", picture)
    steps = ["--set", "steps=4"]

    # Image-to-image at strength 0: the input itself, for every sample.
    r = generate("--model", diffusion, "--prompt", "one", "-n", 2, "--seed", 0, "--init-image", init,
                 "--strength", 0, *steps, "-o", tmp_path / "same.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "1 x 2 images (image-to-image)" in r.output
    assert all(np.array_equal(cell, picture) for cell in cells(tmp_path / "same.png", 2))
    # An RGB JPEG-free RGB PNG is converted to the model's one channel (PIL's luminance).
    rgb = write_png(tmp_path / "rgb.png", np.repeat(picture[..., None], 3, axis=-1))
    r = generate("--model", diffusion, "--prompt", "one", "-n", 1, "--init-image", rgb, "--strength", 0,
                 *steps, "-o", tmp_path / "rgb-out.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert np.array_equal(cells(tmp_path / "rgb-out.png", 1)[0], picture)

    # Inpainting: white (>= 128) regenerated, black kept, exactly.
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, : SIZE // 2] = 200
    mask_png = write_png(tmp_path / "mask.png", mask)
    r = generate("--model", diffusion, "--prompt", "one", "-n", 1, "--seed", 1, "--init-image", init,
                 "--mask", mask_png, *steps, "-o", tmp_path / "inpaint.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    (painted,) = cells(tmp_path / "inpaint.png", 1)
    keep = mask < 128
    assert np.array_equal(painted[keep], picture[keep])
    assert not np.array_equal(painted[~keep], picture[~keep])

    # Interpolation: N frames in a row, whose ends are the end points generated alone.
    r = generate("--model", diffusion, "--interpolate", "--prompt", "the digit 1", "--prompt", "the digit 7",
                 "--seed", 3, "--seed-b", 4, "--frames", 5, *steps, "-o", tmp_path / "walk.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "5 frames in a row" in r.output
    with Image.open(tmp_path / "walk.png") as strip:
        assert strip.size == (5 * (SIZE * SCALE + PAD) + PAD, SIZE * SCALE + 2 * PAD)
    frames = cells(tmp_path / "walk.png", 5)
    for prompt, seed, frame in (("the digit 1", 3, frames[0]), ("the digit 7", 4, frames[-1])):
        out = tmp_path / f"end{seed}.png"
        r = generate("--model", diffusion, "--prompt", prompt, "-n", 1, "--seed", seed, *steps, "-o", out)
        assert r.exit_code == 0, r.output
        assert np.array_equal(cells(out, 1)[0], frame)


def test_bad_edit_inputs_are_clear_errors(diffusion, tmp_path):
    big = write_png(tmp_path / "big.png", np.zeros((16, 16), dtype=np.uint8))
    ok = write_png(tmp_path / "ok.png", np.zeros((SIZE, SIZE), dtype=np.uint8))
    (tmp_path / "notes.png").write_text("not an image")
    gif = tmp_path / "anim.gif"
    Image.new("L", (SIZE, SIZE)).save(gif)
    m = ["--model", diffusion, "--prompt", "one"]
    cases = [
        ([*m, "--init-image", big], "--init-image is 16x16 pixels; the model makes 8x8 images"),
        ([*m, "--init-image", ok, "--mask", big], "--mask is 16x16 pixels; the model makes 8x8 images"),
        ([*m, "--init-image", tmp_path / "missing.png"], "--init-image"),
        ([*m, "--init-image", tmp_path / "notes.png"], "--init-image is not an image file (PNG or JPEG"),
        ([*m, "--init-image", gif], "--init-image is GIF; the format must be PNG or JPEG"),
        ([*m, "--init-image", ok, "--strength", 1.5], "strength must be in [0, 1]"),
        ([*m, "--mask", ok], "--mask needs --init-image"),
        ([*m, "--strength", 0.5], "--strength needs --init-image"),
        ([*m, "--frames", 4], "--frames needs --interpolate"),
        ([*m, "--interpolate"], "--interpolate needs two different ends"),
        ([*m, "--interpolate", "--seed-b", 1, "--init-image", ok], "--interpolate takes no --init-image"),
        ([*m, "--interpolate", "--seed-b", 1, "--frames", 1], "frames must be an integer >= 2"),
    ]
    for args, message in cases:
        r = generate(*args, "-o", tmp_path / "never.png")
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)
        assert "Traceback" not in r.output
    assert "No such file" in generate(*m, "--init-image", tmp_path / "missing.png").output
    assert not (tmp_path / "never.png").exists()


def test_a_family_without_an_edit_names_what_it_supports(tmp_path):
    gan = _export("gan", tmp_path / "gan")  # the GAN interpolates but has no image-to-image
    ok = write_png(tmp_path / "ok.png", np.zeros((SIZE, SIZE), dtype=np.uint8))
    r = generate("--model", gan, "--prompt", "one", "--init-image", ok, "-o", tmp_path / "x.png")
    assert r.exit_code == 2, r.output
    assert "family 'gan' does not support img2img" in r.output
    assert "its editing operations: interpolate" in r.output
    r = generate("--model", gan, "--prompt", "one", "--interpolate", "--seed-b", 2, "-o", tmp_path / "x.png")
    assert r.exit_code == 0 and "frames in a row" in r.output, r.output


def _b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        return np.asarray(img)


def test_the_pyfunc_takes_edits_as_params(diffusion, tmp_path):
    """The pyfunc as MLflow loads it, with the signature aigc register logs: the edit params are
    declared (MLflow drops undeclared params) and reach generate() / interpolate()."""
    from pathlib import Path

    import mlflow.pyfunc
    import pandas as pd

    from aigc.models.export import load_export
    from aigc.registry import pyfunc
    from aigc.registry.register import signature_for

    module = load_export(diffusion)
    mlflow.pyfunc.save_model(
        path=str(tmp_path / "pyfunc"),
        python_model=str(Path(pyfunc.__file__).with_name("model_code.py")),
        artifacts={pyfunc.EXPORT_ARTIFACT: str(diffusion)},
        signature=signature_for(module),
        pip_requirements=["mlflow"],  # no requirement inference (it would load the model again)
    )
    model = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    declared = {p.name for p in model.metadata.get_params_schema().params}
    assert {"init_image", "mask", "strength", "prompt_b", "seed_b", "frames"} <= declared

    picture = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    one = pd.DataFrame({"prompt": ["one"]})
    same = model.predict(one, params={"init_image": _b64(picture), "strength": 0.0, "num_samples": 2})
    assert len(same) == 2 and all(np.array_equal(_pixels(p), picture) for p in same)

    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[2:6, 2:6] = 255
    (painted,) = model.predict(one, params={"init_image": _b64(picture), "mask": _b64(mask), "seed": 0})
    keep = mask < 128
    assert np.array_equal(_pixels(painted)[keep], picture[keep])

    frames = model.predict(one, params={"prompt_b": "the digit 7", "frames": 3, "seed": 5, "steps": 4})
    assert len(frames) == 3
    end = model.predict(pd.DataFrame({"prompt": ["the digit 7"]}), params={"seed": 5, "steps": 4})
    assert frames[-1] == end[0]

    with pytest.raises(ValueError, match="is 16x16 pixels; the model makes 8x8"):
        model.predict(one, params={"init_image": _b64(np.zeros((16, 16), dtype=np.uint8))})
    with pytest.raises(ValueError, match="interpolation takes one prompt row"):
        model.predict(pd.DataFrame({"prompt": ["a", "b"]}), params={"seed_b": 3})
