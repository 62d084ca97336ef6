"""Caption templates for the embedded digits dataset.

Each sample's caption comes from one of :data:`TRAIN_TEMPLATES`, picked by a hash of the sample's
key, so two builds give the same captions. One more template, :data:`HELDOUT_TEMPLATE`, is never
used in any shard (train or val): the evaluator generates from it to test whether a model
understands a phrasing it never saw. Its words all occur in the training templates; only the
combination is new, so a tokenizer built from training captions has no unknown words for it.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "NUMBER_WORDS",
    "TRAIN_TEMPLATES",
    "HELDOUT_TEMPLATE",
    "template_index",
    "digit_caption",
    "heldout_captions",
]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# ``{word}`` is the number word ("seven"), ``{digit}`` the numeral ("7"); the mix teaches both.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {word}",
    "the number {digit} written by hand",
    "a drawing of the digit {digit}",
    "a scanned image of a handwritten {word}",
    "the digit {word}, written by hand",
    "a small image of the number {digit}",
)

HELDOUT_TEMPLATE = "a drawing of the handwritten number {word}"


def _check_label(label: int) -> int:
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must be 0..9, got {label!r}")
    return int(label)


def template_index(key: str) -> int:
    """The training template used for ``key``: a stable hash, not Python's salted ``hash()``."""
    h = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") % len(TRAIN_TEMPLATES)


def digit_caption(label: int, key: str) -> str:
    """The training caption of the digit sample ``key`` with class ``label`` (0..9)."""
    label = _check_label(label)
    template = TRAIN_TEMPLATES[template_index(key)]
    return template.format(word=NUMBER_WORDS[label], digit=label)


def heldout_captions(label: int) -> str:
    """The caption of ``label`` in the held-out template, which no shard ever contains."""
    label = _check_label(label)
    return HELDOUT_TEMPLATE.format(word=NUMBER_WORDS[label], digit=label)
