"""A pretrained reader of the question, for designs whose retrieval query is learnt from scratch.

A backbone trained from scratch on one corpus knows only the corpus's words: a question phrased with words it
never saw ("What is the birthplace of X?" when training only said "born in") gives its learnt query nothing to
go on, while a pretrained text encoder (MiniLM, the one RAG and Memory³ search with) knows them. PlugLM and
ExplicitLM take an optional ``query_encoder``: each text's first sentence or line (a prompt's question: RAG's
query, :func:`memlm.model.memory.rag.query_text`) is embedded by it, and the positions from that sentence's last
token on are marked as having read it, so nothing before it depends on it (causal). Where a design retrieves
with it, the entries are searched by that encoder's vectors of their keys (:meth:`QuestionReader.entry_vectors`,
from the bank's vector cache) in a :class:`~memlm.model.memory.row_index.RowIndex`: one search per text, not
per token, and from 50,000 entries on through memlm's FAISS index (IVF: ~sqrt(N) vectors scanned, not N).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from memlm.errors import ConfigError
from memlm.model.memory.rag import query_text

CACHE_LIMIT = 200_000  # swapped objects make new first sentences: the embedding cache stays bounded


class QuestionReader:
    """Embeds texts' first sentences with the encoder ``spec`` (a :mod:`memlm.encode` spec) of width ``dim``."""

    def __init__(self, spec: str, dim: int, tokenizer) -> None:
        self.spec, self.dim, self.tokenizer = spec, dim, tokenizer
        self._encoder = None
        self._cache: dict[str, Tensor] = {}  # first sentence -> its embedding

    @property
    def encoder(self):
        if self._encoder is None:
            from memlm.encode import load_encoder

            self._encoder = load_encoder(self.spec)
            if self._encoder.dim != self.dim:
                raise ConfigError(
                    f"model.memory_options.query_encoder {self.spec!r} gives {self._encoder.dim}-d embeddings, "
                    f"query_encoder_dim is {self.dim}"
                )
        return self._encoder

    def clear_cache(self) -> None:
        """Forget the cached embeddings (speed measurements start every design cold)."""
        self._cache.clear()

    def embed(self, texts: Sequence[str]) -> Tensor:
        """(B, E) embeddings of each text's first sentence or line (cached by that sentence)."""
        queries = [query_text(t) for t in texts]
        todo = list(dict.fromkeys(q for q in queries if q not in self._cache))
        if todo:
            if len(self._cache) > CACHE_LIMIT:
                self._cache.clear()
            self._cache.update(zip(todo, torch.from_numpy(self.encoder.encode(todo)).float()))
        return torch.stack([self._cache[q] for q in queries])

    def mask(self, texts: Sequence[str], rows: Sequence[Sequence[int]], T: int, *, left_pad: bool) -> Tensor:
        """(B, T) bool: the positions of each token row that have read its text's first sentence. Training
        rows are right-padded; generation left-pads, so each row's marks end where its prompt ends."""
        out = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, (text, row) in enumerate(zip(texts, rows)):
            start = (T - len(row) if left_pad else 0) + sentence_end(self.tokenizer, text, len(row))
            out[i, start:] = True
        return out

    def entry_vectors(self, bank, ids: Sequence[int], texts: Sequence[str], key: str) -> Tensor:
        """(M, E) the encoder's vectors of entries ``ids``, whose ``key`` (:data:`memlm.bank.vectors.KEYS`:
        about is "subject relation" of a triple) reads ``texts``: from the bank's vector cache (RAG's, when it
        searches with the same encoder and key; synced here unless the bank is read-only), anything it lacks
        encoded in memory."""
        from memlm.bank.vectors import VectorCache

        ids = [int(i) for i in ids]
        if not ids:
            return torch.zeros(0, self.dim)
        cache = VectorCache(bank, self.encoder, key=key)
        if not bank.readonly:
            cache.sync(ids)
        found, vecs, _ = cache.fetch(ids)
        have = dict(zip(found.tolist(), vecs))
        todo = [(i, t) for i, t in zip(ids, texts) if i not in have]
        if todo:
            have.update(zip((i for i, _ in todo), self.encoder.encode([t for _, t in todo])))
        return torch.from_numpy(np.stack([have[i] for i in ids]))


def key_text(entry, key: str) -> str:
    """What of an entry a key encodes, as :data:`memlm.bank.vectors.KEYS` says in SQL: ``about`` is "subject
    relation" of a triple (its text otherwise), ``text`` its text."""
    if key == "about" and entry.subject and entry.relation:
        return f"{entry.subject} {entry.relation.replace('_', ' ')}"
    return entry.text


def sentence_end(tokenizer, text: str, row_len: int) -> int:
    """The position (BOS = 0) of the last token of ``text``'s first sentence or line in its token row of
    ``row_len``: from there on a position has read it (``row_len`` for a blank one: none has). Counted on the
    sentence's own tokens: byte-level BPE never merges across the sentence end."""
    q = query_text(text)
    return len(tokenizer.encode(q)) if q.strip() else row_len


def read_mask(text: Tensor | None, text_mask: Tensor | None, T: int, design: str) -> Tensor:
    """(B, T) bool: the positions of a forward call over T tokens that have read the question. The mask is
    aligned with the rows' end, so a cached decoding step (T = 1) takes the last column: once a prompt is read,
    every later position has read it."""
    if text is None or text_mask is None:
        raise ValueError(f"this {design} reads a query encoder: the reader must hand it text and text_mask")
    mask = text_mask[:, -T:]
    if mask.shape[1] != T:
        raise ValueError(f"text_mask covers {mask.shape[1]} positions, the input {T}")
    return mask
