"""The shared caption tokenizer and text encoder (aigc.models.text)."""

from __future__ import annotations

import json

import pytest
import torch

from aigc.models.text import CHAR_PREFIX, SPECIALS, TextEncoder, TextEncoderConfig, Tokenizer, split_words

CAPTIONS = ["a handwritten digit seven", "the number 7 written by hand", "the digit two, written by hand"]


def test_vocabulary_is_deterministic_and_order_independent() -> None:
    a = Tokenizer.build(CAPTIONS)
    b = Tokenizer.build(list(reversed(CAPTIONS)) + CAPTIONS[:1])
    assert a.vocab == b.vocab
    assert a.vocab[: len(SPECIALS)] == list(SPECIALS)
    assert {"seven", "7", ",", "handwritten"} <= set(a.vocab)
    assert CHAR_PREFIX + "z" not in a.vocab and CHAR_PREFIX + "s" in a.vocab


def test_min_count_drops_rare_words_but_keeps_their_characters() -> None:
    tok = Tokenizer.build(CAPTIONS, min_count=2)
    assert "written" in tok.vocab and "seven" not in tok.vocab
    ids = tok.tokenize("seven")
    assert ids[0] == tok.unk_id and tok.decode(ids) == "seven"


def test_split_words_lowercases_and_separates_punctuation() -> None:
    assert split_words("The Digit TWO, by hand!") == ["the", "digit", "two", ",", "by", "hand", "!"]


def test_unknown_words_fall_back_to_characters() -> None:
    tok = Tokenizer.build(CAPTIONS)
    known = tok.tokenize("a digit")
    assert tok.unk_id not in known and len(known) == 2
    tea, the_ = tok.tokenize("tea"), tok.tokenize("hat")  # unseen words made of seen characters
    assert tea[0] == tok.unk_id and len(tea) == 1 + 3
    assert tea != the_  # two unseen words do not collapse onto one id
    assert tok.decode(tok.tokenize("a tea digit")) == "a tea digit"
    # a character never seen at all is <unk> too
    assert tok.tokenize("q") == [tok.unk_id, tok.unk_id]


def test_encode_layout_padding_and_truncation() -> None:
    tok = Tokenizer.build(CAPTIONS)
    ids, mask = tok.encode(["a handwritten digit seven", "", "the number 7 written by hand"], max_len=6)
    assert ids.shape == mask.shape == (3, 6) and ids.dtype == torch.long and mask.dtype == torch.bool
    # row 0: <bos> a handwritten digit seven <eos>
    assert ids[0].tolist() == [tok.bos_id, *tok.tokenize("a handwritten digit seven"), tok.eos_id]
    # the empty caption is the unconditional input: <bos> <eos> and padding
    assert ids[1].tolist() == [tok.bos_id, tok.eos_id] + [tok.pad_id] * 4
    assert mask[1].tolist() == [True, True] + [False] * 4
    # truncated to max_len, still ending in <eos>
    assert ids[2, -1].item() == tok.eos_id and mask[2].all()
    assert torch.equal(mask, ids != tok.pad_id)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(["a"], max_len=1)


def test_save_load_round_trip(tmp_path) -> None:
    tok = Tokenizer.build(CAPTIONS)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert json.loads(path.read_text())["type"] == "aigc-word-char/1"
    loaded = Tokenizer.load(path)
    assert loaded.vocab == tok.vocab
    texts = ["a handwritten digit seven", "unseen words here", ""]
    for a, b in zip(tok.encode(texts, 10), loaded.encode(texts, 10), strict=True):
        assert torch.equal(a, b)
    assert Tokenizer.from_dict(tok.to_dict()).vocab == tok.vocab


def test_bad_tokenizer_data_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        Tokenizer.from_dict({"type": "bpe", "vocab": list(SPECIALS)})
    with pytest.raises(ValueError, match="must start with"):
        Tokenizer(["a", *SPECIALS])
    with pytest.raises(ValueError, match="duplicate"):
        Tokenizer([*SPECIALS, "a", "a"])


def _encoder(layers: int = 2) -> tuple[Tokenizer, TextEncoder]:
    torch.manual_seed(0)
    tok = Tokenizer.build(CAPTIONS)
    return tok, TextEncoder(TextEncoderConfig(len(tok), dim=32, layers=layers, heads=4, max_tokens=12)).eval()


@pytest.mark.parametrize("layers", [0, 2])
def test_encoder_shapes_and_masked_mean(layers: int) -> None:
    tok, enc = _encoder(layers)
    ids, mask = tok.encode(["a handwritten digit seven", "", "the digit two, written by hand"], 12)
    tokens, pooled = enc(ids, mask)
    assert tokens.shape == (3, 12, 32) and pooled.shape == (3, 32)
    m = mask.unsqueeze(-1).float()
    assert torch.allclose(pooled, (tokens * m).sum(1) / m.sum(1), atol=1e-6)


def test_encoder_ignores_padding_and_separates_captions() -> None:
    tok, enc = _encoder()
    ids, mask = tok.encode(["a handwritten digit seven", "the number 7 written by hand"], 12)
    with torch.no_grad():
        tokens, pooled = enc(ids, mask)
        junk = ids.clone()
        junk[~mask] = 5  # change only padded positions
        tokens2, pooled2 = enc(junk, mask)
        other = enc(*tok.encode(["a handwritten digit two", "the number 7 written by hand"], 12))[1]
    assert torch.allclose(pooled, pooled2, atol=1e-5)
    assert torch.allclose(tokens[mask], tokens2[mask], atol=1e-5)
    assert not torch.allclose(pooled[0], other[0]) and torch.allclose(pooled[1], other[1], atol=1e-5)


def test_encoder_rejects_too_many_tokens() -> None:
    tok, enc = _encoder()
    ids, mask = tok.encode(["a handwritten digit seven"], 13)
    with pytest.raises(ValueError, match="max_tokens=12"):
        enc(ids, mask)
