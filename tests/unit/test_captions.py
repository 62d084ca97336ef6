"""Caption templates of the digits dataset: deterministic, all digits, held-out template unused."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from aigc.data.captions import (
    HELDOUT_TEMPLATE,
    NUMBER_WORDS,
    TRAIN_TEMPLATES,
    digit_caption,
    heldout_captions,
    template_index,
)

KEYS = [f"digits-{i:06d}" for i in range(1797)]


def test_at_least_six_training_templates_and_one_held_out():
    assert len(TRAIN_TEMPLATES) >= 6
    assert len(set(TRAIN_TEMPLATES)) == len(TRAIN_TEMPLATES)
    assert HELDOUT_TEMPLATE not in TRAIN_TEMPLATES
    # Both number words and numerals appear in training captions.
    assert any("{word}" in t for t in TRAIN_TEMPLATES)
    assert any("{digit}" in t for t in TRAIN_TEMPLATES)


def test_caption_is_a_function_of_key_and_label():
    first = [digit_caption(i % 10, k) for i, k in enumerate(KEYS)]
    again = [digit_caption(i % 10, k) for i, k in enumerate(KEYS)]
    assert first == again
    # Every template is used across the dataset's keys, roughly evenly.
    counts = [sum(template_index(k) == t for k in KEYS) for t in range(len(TRAIN_TEMPLATES))]
    assert min(counts) > len(KEYS) / len(TRAIN_TEMPLATES) / 2


def test_captions_do_not_depend_on_python_hash_seed():
    code = (
        "from aigc.data.captions import digit_caption;"
        "print('|'.join(digit_caption(i % 10, f'digits-{i:06d}') for i in range(50)))"
    )
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
    assert len(outs) == 1
    assert outs.pop().strip() == "|".join(digit_caption(i % 10, f"digits-{i:06d}") for i in range(50))


@pytest.mark.parametrize("label", range(10))
def test_every_digit_is_named_in_its_captions(label):
    captions = {digit_caption(label, k) for k in KEYS[:200]}
    assert len(captions) == len(TRAIN_TEMPLATES)
    other = {w for i, w in enumerate(NUMBER_WORDS) if i != label} | {str(i) for i in range(10) if i != label}
    for caption in captions:
        words = set(re.findall(r"\w+", caption))
        assert NUMBER_WORDS[label] in words or str(label) in words
        assert not words & other


def test_held_out_template_never_used_for_training():
    heldout = {heldout_captions(label) for label in range(10)}
    assert len(heldout) == 10
    training = {digit_caption(label, k) for label in range(10) for k in KEYS}
    assert not heldout & training
    for label in range(10):
        assert heldout_captions(label) == HELDOUT_TEMPLATE.format(word=NUMBER_WORDS[label], digit=label)


def test_held_out_words_all_occur_in_training_captions():
    # A new phrasing of known words: a tokenizer built on training captions knows every word.
    vocab = {
        w for label in range(10) for k in KEYS[:200] for w in re.findall(r"\w+", digit_caption(label, k))
    }
    for label in range(10):
        assert set(re.findall(r"\w+", heldout_captions(label))) <= vocab


def test_bad_label_is_rejected():
    with pytest.raises(ValueError, match="0..9"):
        digit_caption(10, "digits-000000")
    with pytest.raises(ValueError, match="0..9"):
        heldout_captions(-1)
