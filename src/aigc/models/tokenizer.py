"""The caption tokenizer every family saves with its model (``tokenizer.json``); see
:mod:`aigc.models.text` for the encoders that read its ids.

Pure Python, torch imported only by :meth:`Tokenizer.encode`: ``aigc train``'s driver builds the
tokenizer from the training captions before Ray's thread starts, and importing torch there (1 s)
would be a second copy of the import Ray Train's ``TorchTrainer`` makes on that thread anyway.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
CHAR_PREFIX = "##"  # character-fallback tokens are "##a", "##7", ...
_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-case and split into words and single punctuation marks."""
    return _WORD_RE.findall(text.lower())


class Tokenizer:
    """Word-level tokenizer with a character fallback; ids 0..3 are ``<pad> <unk> <bos> <eos>``."""

    def __init__(self, vocab: list[str]):
        if list(vocab[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocabulary has duplicate tokens")
        self.vocab = list(vocab)
        self.index = {tok: i for i, tok in enumerate(self.vocab)}

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Tokenizer:
        """Vocabulary from ``captions``: words seen ``min_count`` times, then every character seen."""
        words: Counter[str] = Counter()
        chars: set[str] = set()
        for caption in captions:
            for w in split_words(caption):
                words[w] += 1
                chars.update(w)
        # Sorted so that the same captions give the same ids whatever their order.
        vocab = list(SPECIALS)
        vocab += sorted(w for w, c in words.items() if c >= min_count)
        vocab += sorted(CHAR_PREFIX + c for c in chars)
        return cls(vocab)

    def extend(self, captions: Iterable[str]) -> Tokenizer:
        """This vocabulary followed by the words and characters of ``captions`` it lacks (sorted, as
        :meth:`build` orders them): every existing token keeps its id, so a model fine-tuned with the
        extended tokenizer (``aigc train --init-from``) keeps the embedding of every word it knew."""
        new = Tokenizer.build(captions)
        added = [t for t in new.vocab[len(SPECIALS) :] if t not in self.index]
        words = sorted(t for t in added if not t.startswith(CHAR_PREFIX))
        chars = sorted(t for t in added if t.startswith(CHAR_PREFIX))
        return Tokenizer(self.vocab + words + chars)

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        """Ids for one caption, without ``<bos>``/``<eos>`` and without truncation."""
        ids: list[int] = []
        for w in split_words(text):
            if w in self.index:
                ids.append(self.index[w])
                continue
            ids.append(self.unk_id)
            ids.extend(self.index.get(CHAR_PREFIX + c, self.unk_id) for c in w)
        return ids

    def encode(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-encode to ``ids (B, max_len)`` and ``mask (B, max_len)`` (True on real tokens).

        Each row is ``<bos> tokens... <eos>`` truncated to ``max_len`` and right-padded.
        """
        import torch

        if max_len < 2:
            raise ValueError("max_len must be at least 2 (<bos> and <eos>)")
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            row = [self.bos_id, *self.tokenize(text)[: max_len - 2], self.eos_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != self.pad_id

    def decode(self, ids: Iterable[int]) -> str:
        """Best-effort inverse of :meth:`tokenize` (for debugging and model cards)."""
        out: list[str] = []
        for i in ids:
            tok = self.vocab[int(i)]
            if tok in (PAD, BOS, EOS):
                continue
            if tok.startswith(CHAR_PREFIX) and out and out[-1] != UNK:
                out[-1] += tok[len(CHAR_PREFIX) :]
            elif tok.startswith(CHAR_PREFIX):
                out[-1] = tok[len(CHAR_PREFIX) :]
            else:
                out.append(tok)
        return " ".join(out)

    def to_dict(self) -> dict:
        return {"type": "aigc-word-char/1", "vocab": self.vocab}

    @classmethod
    def from_dict(cls, data: dict) -> Tokenizer:
        if data.get("type") != "aigc-word-char/1":
            raise ValueError(f"unknown tokenizer type {data.get('type')!r}; expected 'aigc-word-char/1'")
        return cls(list(data["vocab"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
