"""A fast, dependency-free text encoder: signed feature hashing of words, word bigrams and char trigrams.

Deterministic across processes and machines (crc32, not Python's salted ``hash``), so its vectors can be
cached and its fingerprint never changes. Good enough for tests and for huge banks where a neural encoder
would be the bottleneck; lexical, not semantic.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

from memlm.encode.base import l2_normalise

_WORD = re.compile(r"\w+")


class HashingEncoder:
    """Texts -> (N, dim) float32 unit vectors. ``char_weight`` scales char-trigram features (fuzzy matches)."""

    def __init__(self, *, dim: int = 384, char_weight: float = 0.5, bigrams: bool = True) -> None:
        self.dim, self.char_weight, self.bigrams = int(dim), float(char_weight), bigrams
        self.fingerprint = f"hashing-v1:dim={self.dim}:char={self.char_weight}:bigrams={int(bigrams)}"

    def _features(self, text: str) -> tuple[list[int], list[float]]:
        words = _WORD.findall(text.lower())
        feats = [w.encode() for w in words]
        weights = [1.0] * len(feats)
        if self.bigrams:
            feats += [f"{a} {b}".encode() for a, b in zip(words, words[1:])]
        weights += [1.0] * (len(feats) - len(weights))
        if self.char_weight:
            grams = [f"#{w}#"[i : i + 3].encode() for w in words for i in range(len(w))]
            feats += grams
            weights += [self.char_weight] * len(grams)
        return [zlib.crc32(f) for f in feats], weights

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        rows, hashes, weights = [], [], []
        for i, t in enumerate(texts):
            h, w = self._features(t)
            rows += [i] * len(h)
            hashes += h
            weights += w
        h = np.asarray(hashes, dtype=np.uint32)
        # low bits pick the column, bit 31 the sign: signed hashing keeps inner products unbiased.
        sign = np.where(h >> 31, -1.0, 1.0).astype(np.float32)
        flat = np.asarray(rows, np.int64) * self.dim + (h % self.dim).astype(np.int64)
        # bincount is a scatter-add an order of magnitude faster than np.add.at
        out = np.bincount(
            flat, weights=sign * np.asarray(weights, np.float32), minlength=len(texts) * self.dim
        )
        return l2_normalise(out.reshape(len(texts), self.dim).astype(np.float32))
