"""Make the README's "Edit and explore" images with the README's own `aigc generate` commands.

Run from a project where `make quickstart` has made `aigc-diffusion@production` (the digits model):

    .venv/bin/python docs/images/editing.py

It writes, beside this file, the inputs the commands take (`seven.png`, the first "seven" of the
digits' val split, and `top-half.png`, a mask whose white top half is regenerated) and
`editing-*.png`: the commands' grids (8x8 pixels per image) enlarged 8x, nearest neighbour, for the
README. Every command it runs is printed.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
AIGC = str(Path(sys.executable).parent / "aigc")
MODEL = "aigc-diffusion@production"
SCALE = 8


def run(args: list[str]) -> None:
    print("$ aigc " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([AIGC, *args], check=True)  # in the project: its MLflow store and registry


def enlarge(path: Path) -> None:
    image = Image.open(path)
    big = image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)
    big.save(HERE / f"editing-{path.name}")


def main(out: Path) -> None:
    from aigc.evaluation.data import read_split

    val = read_split(Path.cwd() / "datasets" / "digits", "val")
    seven = val.images[val.labels.tolist().index(7)]  # (1, 8, 8) uint8
    Image.fromarray(seven[0].numpy(), "L").save(HERE / "seven.png")
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:4] = 255
    Image.fromarray(mask, "L").save(HERE / "top-half.png")

    one = ["generate", "--model", MODEL, "--seed", "0", "--prompt", "a handwritten digit one", "-n", "4"]
    edit = [*one, "--init-image", str(HERE / "seven.png")]
    run([*one, "-o", str(out / "text-to-image.png")])
    for strength in ("0.3", "0.6", "0.8"):
        run([*edit, "--strength", strength, "-o", str(out / f"img2img-{strength}.png")])
    run([*edit, "--mask", str(HERE / "top-half.png"), "-o", str(out / "inpainted.png")])
    walk = ["--prompt", "a handwritten digit one", "--prompt", "a handwritten digit seven"]
    walk += ["--seed", "0", "--seed-b", "1", "--frames", "8", "-o", str(out / "walk.png")]
    run(["generate", "--model", MODEL, "--interpolate", *walk])
    for path in [HERE / "seven.png", HERE / "top-half.png", *sorted(out.glob("*.png"))]:
        enlarge(path)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
