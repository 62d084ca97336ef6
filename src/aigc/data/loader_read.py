"""The one reader of shards: tar members grouped into samples, and the samples decoded.

The streaming loader reads a piece of a shard with :func:`iter_piece` (bad data counted, not
fatal); whatever reads a whole shard (the evaluator's split reader, the captions for a tokenizer,
previews, tests and benchmarks) uses :func:`iter_tar_samples`. Both group members by WebDataset's
rule in one place (:func:`_group`), and :func:`decode_image` is the one image decoder.

Tars are opened through ``fsspec.open(url, "rb")`` (local paths, ``file://``, ``s3://``, ``gs://``,
``https://``...) and read forward as a stream by :func:`iter_tar_files`, never through a shell. Only three
kinds of member are ever decoded: the image (png/jpg/jpeg/webp, by PIL, and JPEG at the dataset's size
by libjpeg-turbo through ``simplejpeg``, see :func:`decode_image`; in a latent dataset the
``.npy`` latent array, by ``numpy.load(allow_pickle=False)``, see :func:`aigc.data.latents.decode_npy`),
the caption (``.txt``, UTF-8) and the metadata (``.json``); everything else in a sample is ignored, so
nothing is unpickled.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import simplejpeg
from PIL import Image

from aigc.data.latents import LATENT_EXT, decode_npy
from aigc.data.manifest import DatasetError

__all__ = [
    "BadDataError",
    "BadSample",
    "ReadStats",
    "IMAGE_EXTS",
    "iter_piece",
    "iter_tar_files",
    "iter_tar_samples",
    "TarFormatError",
    "decode_image",
    "decode_sample",
]

log = logging.getLogger("aigc.data.loader")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
_PIL_FORMATS = ["PNG", "JPEG", "WEBP"]  # the only decoders PIL may pick
_MAX_PIXELS = 2**24  # refuse to decode larger images (memory bombs); shards hold small ones
_MAX_LOGGED = 10  # per-sample warnings per worker and epoch; the summary counts the rest


class BadDataError(RuntimeError):
    """Too many unreadable samples: the message names the fraction, the threshold and the worst shards.

    Takes a single message so DataLoader workers can re-raise it in the main process as itself.
    """


class BadSample(ValueError):
    """One sample that cannot be used; the message says why."""


@dataclass
class ReadStats:
    """What one process (a DataLoader worker, or the main process with ``num_workers=0``) read.

    ``assigned`` counts the samples of the slot's share (good + bad + missing from short tars);
    ``bad`` the unusable ones per shard path. The bad-data threshold compares ``bad`` with
    ``assigned`` of this process only: workers cannot see each other's counts.
    """

    assigned: int = 0
    good: int = 0
    padded: int = 0
    batches: int = 0
    bad: Counter = field(default_factory=Counter)
    logged: int = 0

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def record_bad(self, url: str, key: str | None, reason: str, count: int = 1) -> None:
        """Count ``count`` bad samples of shard ``url`` and log a warning naming the shard and key."""
        self.bad[url] += count
        if self.logged < _MAX_LOGGED:
            where = f"{url}: sample {key}" if key else url
            log.warning("%s: %s; skipped", where, reason)
            self.logged += 1
            if self.logged == _MAX_LOGGED:
                log.warning("further bad samples in this worker are only counted (summary at the end)")

    def check(self, max_bad_fraction: float) -> None:
        """Raise :class:`BadDataError` once bad samples exceed ``max_bad_fraction`` of the share.

        ``assigned`` is the whole share of the epoch, so raising early gives the same answer as
        checking at the end: the final fraction can only be higher.
        """
        if not self.assigned or self.num_bad <= max_bad_fraction * self.assigned:
            return
        worst = ", ".join(f"{url} ({n})" for url, n in self.bad.most_common(3))
        raise BadDataError(
            f"bad samples: {self.num_bad} of {self.assigned} read by this worker "
            f"(fraction {self.num_bad / self.assigned:.4f} > max_bad_fraction {max_bad_fraction}); "
            f"worst shards: {worst}"
        )


class TarFormatError(ValueError):
    """A tar that is truncated or not a tar; the message gives the byte offset."""


_BLOCK = 512


def _octal(field: bytes, at: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"bad tar header at byte {at}: not a tar, or corrupt") from None


class _Chunks:
    """Forward-only reads from a binary stream in large chunks (one ``read`` call per MiB, not three
    per tar member: per-call overhead dominates with small images)."""

    def __init__(self, f, chunk: int = 2**20) -> None:
        self.f, self.chunk = f, chunk
        self.buf, self.pos, self.offset = b"", 0, 0  # offset: stream position of buf[0]

    def take(self, size: int) -> bytes:
        """The next ``size`` bytes, or fewer at the end of the stream."""
        end = self.pos + size
        if end > len(self.buf):
            rest = self.buf[self.pos :]
            self.offset += self.pos
            more = self.f.read(max(self.chunk, size - len(rest)))
            self.buf, self.pos, end = rest + more, 0, size
        out = self.buf[self.pos : end]
        self.pos = min(end, len(self.buf))
        return out

    def tell(self) -> int:
        return self.offset + self.pos


def iter_tar_files(f) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for each regular file of an uncompressed tar read sequentially from ``f``.

    A small streaming reader of ustar/pax/GNU tars, several times faster per member than
    :mod:`tarfile` (which parses every header field and reads in small pieces); that matters for
    shards of small images. It only reads forward, so any binary stream works. Every header must
    carry the ustar magic (or, for old v7 tars, a valid checksum), so a misaligned or garbled stream
    is an error; a stream that ends before the end-of-archive marker raises :class:`TarFormatError`.
    """
    src = _Chunks(f)
    long_name: str | None = None
    while True:
        at = src.tell()
        header = src.take(_BLOCK)
        if len(header) != _BLOCK:
            where = "no end-of-archive marker" if not header else "in a header"
            raise TarFormatError(f"unexpected end of data at byte {at + len(header)} ({where})")
        if header[0] == 0 and header.count(0) == _BLOCK:
            return  # end-of-archive marker
        if header[257:262] != b"ustar":
            # No magic: an old v7 tar (then the checksum must hold) or not a header at all.
            stored = _octal(header[148:156], at)
            if stored != sum(header[:148]) + 256 + sum(header[156:]) and stored != _signed_sum(header):
                raise TarFormatError(f"bad tar header at byte {at}: not a tar, or corrupt")
        size = _octal(header[124:136], at)
        kind = header[156:157]
        padded = size + (-size % _BLOCK)
        body = src.take(padded)
        if len(body) != padded:
            raise TarFormatError(f"unexpected end of data at byte {at + _BLOCK + len(body)} (in member data)")
        data = body[:size] if padded != size else body
        if kind in (b"x", b"L"):  # the next member's long name: pax "path" record or GNU long name
            gnu = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            long_name = _pax_path(data) if kind == b"x" else gnu
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue  # directories, links, global pax headers: no sample data
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[345] != 0 and header[257:262] == b"ustar":
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        yield name, data


def _signed_sum(header: bytes) -> int:
    # Some old tars computed the checksum over signed bytes; tarfile accepts both, so do we.
    return sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256


def _pax_path(data: bytes) -> str | None:
    # Records are "<len> <key>=<value>\n"; only the path matters here.
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
        pos += length
    return None


def _group(files: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of a stream of tar members, by WebDataset's rule.

    The rule, stated here only: a member ``a/b.c.png`` belongs to the sample with key ``a/b`` (its
    folder and its base name up to the first dot) as its ``c.png`` (the rest, lower-cased); a
    sample is a run of consecutive members with the same key; a name whose base has no dot belongs
    to no sample. A sample is yielded once the next one's first member is read, or the tar ends.
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    for name, data in files:
        folder, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot:
            continue
        k = f"{folder}/{stem}" if folder else stem
        if k != key:
            if key is not None:
                yield key, parts
            key, parts = k, {}
        parts[ext.lower()] = data
    if key is not None:
        yield key, parts


def iter_tar_samples(url: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for every sample of a tar (a path or fsspec URL), in file order.

    Nothing is extracted to disk and nothing is decoded. A tar that is truncated or not a tar raises
    :class:`~aigc.data.manifest.DatasetError` naming ``url``; a missing one the filesystem's
    ``FileNotFoundError``.
    """
    url = os.fspath(url)
    try:
        with fsspec.open(url, "rb") as f:
            yield from _group(iter_tar_files(f))
    except (ValueError, EOFError) as err:  # TarFormatError, or a garbled pax record
        raise DatasetError(
            f"{url}: corrupt shard ({type(err).__name__}: {err}); check it with `aigc data verify`"
        ) from None


def iter_piece(url: str, start: int, stop: int, stats: ReadStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for the samples at positions ``[start, stop)`` of a tar.

    Samples are grouped as :func:`iter_tar_samples` groups them. Samples before ``start`` are read
    past without being decoded; reading stops once sample ``stop - 1`` is whole. A tar that ends
    early or is truncated is logged with its URL, and its missing samples in ``[start, stop)`` are
    counted as bad.
    """
    if stop <= start:
        return
    done = 0  # samples of the tar read whole so far (the position of the one being assembled)
    try:
        with fsspec.open(url, "rb") as f:
            for key, parts in _group(iter_tar_files(f)):
                if done >= start:
                    yield key, parts
                done += 1
                if done >= stop:
                    return
    except (TarFormatError, OSError, EOFError, ValueError) as err:
        # The sample being assembled may be incomplete: it and everything after it is lost.
        lost = stop - max(start, done)
        reason = f"unreadable tar ({type(err).__name__}: {err}); {lost} samples lost"
        stats.record_bad(url, None, reason, lost)
        return
    lost = stop - max(start, done)
    stats.record_bad(url, None, f"tar ends after {done} samples, expected at least {stop}", lost)


def decode_image(data: bytes, mode: str, size: int) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> uint8 array ``(H, W)`` (mode L) or ``(H, W, 3)`` (RGB) at ``size``.

    A JPEG already at ``size`` whose colour space needs no conversion PIL would do its own way goes
    through :func:`_decode_jpeg` (the same pixels, about 4x faster); everything else, and anything
    that path cannot read, goes through PIL, which also words the error of a bad image.
    """
    if data[:2] == b"\xff\xd8":  # JPEG's start-of-image marker
        image = _decode_jpeg(data, mode, size)
        if image is not None:
            return image
    with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
        if im.width * im.height > _MAX_PIXELS:
            raise ValueError(f"{im.width}x{im.height} pixels is more than the {_MAX_PIXELS} allowed")
        if im.mode != mode:
            im = im.convert(mode)
        if im.size != (size, size):
            # Stored images are square at the dataset size; anything else is centre-cropped, resized.
            w, h = im.size
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
            im = im.resize((size, size), Image.Resampling.BICUBIC, box=box)
        return np.asarray(im)


def _decode_jpeg(data: bytes, mode: str, size: int) -> np.ndarray | None:
    """A ``size`` x ``size`` JPEG decoded by libjpeg-turbo through ``simplejpeg``, or None for PIL.

    Why: at 64 px, PIL's JPEG decode (``Image.open`` parses the markers in Python, then the decode
    and the copy out) was ~80 us a sample on one core here, more than the rest of the loader
    together; through ``simplejpeg.decode_jpeg`` it is ~24 us (``benchmarks/loader.py``). Both run
    libjpeg-turbo with the same defaults (accurate integer DCT, smooth chroma upsampling), so the
    pixels are PIL's (``tests/integration/test_loader.py`` checks it on 4:4:4, 4:2:0 and grey JPEGs).
    Only the cases with nothing to convert are taken: YCbCr (or RGB) to RGB, and grey to L. A grey
    JPEG wanted as RGB, RGB wanted as L (PIL's own luma formula), CMYK, another size (centre crop
    and resize) and anything turbojpeg refuses are PIL's.
    """
    try:
        height, width, space, _subsampling = simplejpeg.decode_jpeg_header(data)
        if (height, width) != (size, size):
            return None
        if mode == "RGB" and space in ("YCbCr", "RGB"):
            return simplejpeg.decode_jpeg(data, colorspace="RGB")  # (H, W, 3) uint8
        if mode == "L" and space == "Gray":
            grey = simplejpeg.decode_jpeg(data, colorspace="GRAY")  # (H, W, 1)
            return grey.reshape(height, width)
    except ValueError:
        pass  # PIL decides, and says why a bad image is bad
    return None


def decode_sample(
    parts: dict[str, bytes], mode: str, size: int, latent: dict | None = None
) -> tuple[np.ndarray, str, int]:
    """Decode one raw sample into ``(image uint8 (H, W[, 3]), caption, label)``.

    With ``latent`` (a latent dataset manifest's ``latent`` section) the first element is the
    sample's latent array instead (shape and dtype as the section says).
    Raises :class:`BadSample` for a missing or undecodable image, a missing or non-UTF-8 caption,
    or metadata that is not a JSON object with an int (or null) ``label``. A missing ``.json`` gives
    label -1.
    """
    exts = (LATENT_EXT,) if latent is not None else IMAGE_EXTS
    ext = next((e for e in exts if e in parts), None)
    if ext is None:
        raise BadSample(f"no image (expected one of {', '.join(exts)}; has {', '.join(sorted(parts))})")
    if "txt" not in parts:
        raise BadSample("missing caption (.txt)")
    try:
        caption = parts["txt"].decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample(f"caption is not UTF-8: {err}") from None
    label = -1
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (ValueError, RecursionError) as err:
            raise BadSample(f"bad json: {err}") from None
        if not isinstance(meta, dict):
            raise BadSample("bad json: not an object")
        value = meta.get("label")
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise BadSample(f"bad json: label {value!r} is not an int or null")
            label = value
    if latent is not None:
        try:
            return decode_npy(parts[ext], latent), caption, label
        except ValueError as err:
            raise BadSample(f"undecodable latent (.npy): {err}") from None
    try:
        image = decode_image(parts[ext], mode, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadSample(f"undecodable image (.{ext}): {type(err).__name__}: {err}") from None
    return image, caption, label
