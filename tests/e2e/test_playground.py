"""The playground page of ``aigc serve`` end to end: a real server, a real browser.

A tiny diffusion model trained here and registered in a sqlite registry, served by one real
``aigc serve`` on 127.0.0.1 for the whole file (tests/served_model.py, as
tests/integration/test_serving.py starts it; stopped by process group). Headless Debian Chromium
(playwright, never ``playwright install``) opens ``/`` and uses it as a person would: fills the
form, uploads PNG files, presses Generate. What the page shows is checked against the server's own
answers (the images are read back from the ``<img>`` sources), and a screenshot of each step is
saved (the folder is printed; ``AIGC_TEST_ARTIFACTS`` chooses it).
"""

from __future__ import annotations

import base64
import io
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from e2e_browser import SCREENSHOTS, VIEWPORT, launch, require_browser, screenshot, screenshot_dir
from PIL import Image

from served_model import NAME, get, post, serving, trained_version

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_FRAMES = 6  # --max-frames: an interpolation of 7 frames is the over-limit request
DATA_URL = "data:image/png;base64,"


@pytest.fixture(scope="module")
def playground(request, digits_dataset, tmp_path_factory):
    require_browser()  # before training and the server start, not after
    from playwright.sync_api import sync_playwright

    from aigc.registry.versions import client_for

    shots = screenshot_dir(tmp_path_factory, "playground-screenshots")
    request.config.stash[SCREENSHOTS] = shots  # tests/e2e/conftest.py prints it at the end
    print(f"playground screenshots: {shots}")
    tmp = tmp_path_factory.mktemp("playground")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    version = trained_version(uri, tmp, digits_dataset, "playground", steps=24, seed=0)
    client_for(uri).set_registered_model_alias(NAME, "production", version)

    with (
        serving(f"{NAME}@production", uri, tmp, ["--max-frames", str(MAX_FRAMES)]) as served,
        sync_playwright() as pw,
    ):
        browser = launch(pw)
        try:
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{served.url}/")
            page.wait_for_selector("body[data-ready='1']")  # /info read, the form built
            yield SimpleNamespace(
                url=served.url, page=page, shots=shots, tmp=tmp, version=str(version), errors=errors
            )
            assert not errors, f"uncaught errors in the playground page: {errors}"
        finally:
            browser.close()


# ------------------------------------------------------------------------------------- helpers
def png_file(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path, format="PNG")
    return path


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        return np.asarray(img)


def mode(page, name: str) -> None:
    page.check(f"input[name=mode][value={name}]")


def fill(page, **fields: str | int) -> None:
    """Type into the form's fields by id (``opt_steps`` is the family option ``steps``)."""
    for field, value in fields.items():
        page.fill(f"#{field.replace('opt_', 'opt-')}", str(value))


def press_generate(page) -> int:
    """Press Generate; returns the HTTP status of /generate once the page has drawn the answer."""
    with page.expect_response(lambda r: r.url.endswith("/generate")) as response:
        page.click("#generate")
    page.wait_for_selector("#generate:enabled")  # re-enabled after the answer is drawn
    return response.value.status


def shown_images(page) -> list[str]:
    """The base64 PNGs of the grid, read from the ``<img>`` sources."""
    srcs = page.eval_on_selector_all("#grid img", "els => els.map(e => e.getAttribute('src'))")
    assert all(s.startswith(DATA_URL) for s in srcs), srcs
    return [s[len(DATA_URL) :] for s in srcs]


def error_text(page) -> str | None:
    return page.inner_text("#error") if page.is_visible("#error") else None


# --------------------------------------------------------------------------------------- tests
def test_the_page_and_info_describe_the_served_model(playground):
    with urllib.request.urlopen(f"{playground.url}/", timeout=10) as r:
        assert r.headers.get_content_type() == "text/html"
        assert "<title>aigc playground</title>" in r.read().decode()
    info = get(playground.url, "/info")
    assert (info["model"], info["version"], info["family"]) == (NAME, playground.version, "diffusion")
    assert (info["image_size"], info["channels"]) == (8, 1)
    assert info["edit_modes"] == ["img2img", "inpaint", "interpolate"]
    assert info["options"]["sampler"]["choices"] == ["ddim", "ddpm"]
    steps = info["options"]["steps"]
    assert (steps["type"], steps["default"]) == ("int", 4)  # TINY: model.sample_steps=4
    assert info["limits"]["max_frames"] == MAX_FRAMES and info["defaults"]["frames"] == MAX_FRAMES

    page = playground.page
    header = page.inner_text("#model")
    assert f"{NAME} version {playground.version}" in header and "diffusion" in header and "8×8" in header
    # The family's options are fields of the form, with the model's defaults.
    assert page.get_attribute("#opt-steps", "placeholder") == "default 4"
    samplers = page.eval_on_selector_all("#opt-sampler option", "os => os.map(o => o.value)")
    assert samplers == ["", "ddim", "ddpm"]
    assert page.is_hidden("#mask") and page.is_hidden("#frames")  # text to image: no edit fields


def test_text_to_image_shows_the_samples_and_the_version_that_answered(playground):
    page = playground.page
    mode(page, "generate")
    fill(page, prompt="the digit 3", num_samples=3, seed=7, opt_steps=2)
    assert press_generate(page) == 200
    assert f"{NAME} version {playground.version} answered: 3 images" in page.inner_text("#answered")
    shown = shown_images(page)
    assert len(shown) == 3
    screenshot(page, playground.shots, "1-text-to-image")
    # The same request from a plain client gets the same images: the page sent what the form says.
    status, answer = post(playground.url, {"prompt": "the digit 3", "num_samples": 3, "seed": 7, "steps": 2})
    assert status == 200 and answer["images"] == shown


PICTURE = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)


def test_image_to_image_at_strength_0_returns_the_uploaded_image(playground):
    page = playground.page
    picture = PICTURE
    mode(page, "img2img")
    assert page.is_visible("#init_image") and page.is_hidden("#mask")
    page.set_input_files("#init_image", str(png_file(playground.tmp / "picture.png", picture)))
    page.wait_for_selector("#init_image-preview:visible")
    assert "sent as it is" in page.inner_text("#init_image-note")  # the model's size: not resized
    fill(page, prompt="the digit 1", num_samples=2, strength=0, opt_steps=2)
    assert press_generate(page) == 200
    assert "answered: 2 images" in page.inner_text("#answered")
    shown = shown_images(page)
    assert len(shown) == 2 and all(np.array_equal(pixels(b64), picture) for b64 in shown)
    screenshot(page, playground.shots, "2-image-to-image-strength-0")


def test_inpainting_keeps_the_unmasked_pixels_of_a_mask_resized_in_the_browser(playground):
    """A 32x32 mask is resized nearest-neighbour to the model's 8x8: rows 2-5 regenerated."""
    page = playground.page
    picture = PICTURE
    big_mask = np.zeros((32, 32), dtype=np.uint8)
    big_mask[8:24, :] = 255
    mode(page, "inpaint")
    page.set_input_files("#init_image", str(png_file(playground.tmp / "picture.png", picture)))
    page.set_input_files("#mask", str(png_file(playground.tmp / "mask32.png", big_mask)))
    page.wait_for_selector("#mask-preview:visible")
    assert "32×32 resized to 8×8 in the browser" in page.inner_text("#mask-note")
    fill(page, prompt="the digit 1", num_samples=1, seed=1, strength="", opt_steps=2)
    assert press_generate(page) == 200, error_text(page)
    (shown,) = shown_images(page)
    painted = pixels(shown)
    kept = np.ones(8, dtype=bool)
    kept[2:6] = False
    assert np.array_equal(painted[kept], picture[kept])
    assert not np.array_equal(painted[~kept], picture[~kept])
    screenshot(page, playground.shots, "3-inpainting")
    # Exactly what the 8x8 mask gives from a plain client: the browser's resize kept it binary.
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6, :] = 255
    body = {"prompt": "the digit 1", "seed": 1, "steps": 2}
    for field, arr in (("init_image", picture), ("mask", mask)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        body[field] = base64.b64encode(buf.getvalue()).decode()
    assert post(playground.url, body)[1]["images"] == [shown]


def test_interpolation_shows_the_frames(playground):
    page = playground.page
    mode(page, "interpolate")
    assert page.is_hidden("#num_samples") and page.is_visible("#frames")
    fill(page, prompt="the digit 1", seed=3, prompt_b="the digit 7", seed_b=4, frames=5, opt_steps=2)
    assert press_generate(page) == 200, error_text(page)
    assert "answered: 5 frames" in page.inner_text("#answered")
    shown = shown_images(page)
    assert len(shown) == 5
    screenshot(page, playground.shots, "4-interpolation")
    walk = {
        "prompt": "the digit 1",
        "seed": 3,
        "steps": 2,
        "interpolate": {"prompt_b": "the digit 7", "seed_b": 4},
    }
    assert post(playground.url, {**walk, "interpolate": {**walk["interpolate"], "frames": 5}})[1] == (
        {"model": NAME, "version": playground.version, "images": shown}
    )


def test_an_over_limit_request_shows_the_servers_error_and_the_next_one_works(playground):
    page = playground.page
    mode(page, "interpolate")
    fill(
        page,
        prompt="the digit 2",
        seed=0,
        prompt_b="the digit 5",
        seed_b=1,
        frames=MAX_FRAMES + 1,
        opt_steps=2,
    )
    before = shown_images(page)
    assert press_generate(page) == 422
    error = error_text(page)
    assert error is not None and error.startswith("422: interpolate.frames must be an integer in 2..6")
    assert f"limit max_frames = {MAX_FRAMES}, got {MAX_FRAMES + 1}" in error
    assert shown_images(page) == before  # the last answer stays on the page
    screenshot(page, playground.shots, "5-over-limit-error")

    fill(page, frames=MAX_FRAMES)
    assert press_generate(page) == 200
    assert error_text(page) is None and len(shown_images(page)) == MAX_FRAMES

    mode(page, "generate")
    fill(page, num_samples=17)
    assert press_generate(page) == 422
    assert "limit max_num_samples = 16, got 17" in error_text(page)
    fill(page, num_samples=4)
    assert press_generate(page) == 200
    assert error_text(page) is None and "answered: 4 images" in page.inner_text("#answered")
    screenshot(page, playground.shots, "6-after-the-error")
