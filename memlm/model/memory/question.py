"""A pretrained reader of the question, for designs whose retrieval query is learnt from scratch.

A backbone trained from scratch on one corpus knows only the corpus's words: a question phrased with words it
never saw ("What is the birthplace of X?" when training only said "born in") gives its learnt query nothing to
go on, while a pretrained text encoder (MiniLM, the one RAG and Memory³ search with) knows them. PlugLM and
ExplicitLM take an optional ``query_encoder``: each text's first sentence or line (a prompt's question: RAG's
query, :func:`memlm.model.memory.rag.query_text`) is embedded by it, and the positions from that sentence's last
token on are marked as having read it, so nothing before it depends on it (causal). Where a design retrieves
with it, the entries are searched by that encoder's vectors of their keys (:meth:`QuestionReader.entry_vectors`,
from the bank's vector cache) in a :class:`TextIndex`: one search per text, not per token, and from 50,000
entries on through memlm's FAISS index (IVF: ~sqrt(N) vectors scanned per question, not N).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from memlm.errors import ConfigError
from memlm.model.memory.rag import query_text

CACHE_LIMIT = 200_000  # swapped objects make new first sentences: the embedding cache stays bounded
TEXT_FAISS_FROM = 50_000  # text_index auto: exact torch below this many entries, FAISS from here on
TEXT_INDEXES = ("auto", "exact", "faiss")


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


class TextIndex:
    """The query encoder's vectors of the entries' keys, by table row, and the question's search over them.

    ``index``: ``exact``, one (Q, N) product in torch; ``faiss``, memlm's :class:`~memlm.index.FaissIndex` with
    spec auto (Flat below 50,000 vectors: the same top-n as exact, test; IVF from there on: ~4 sqrt(N) lists, 32
    probed, so ~8 sqrt(N) vectors scanned per question); ``auto``, exact until TEXT_FAISS_FROM rows are live,
    faiss from then on. Rows never set, or removed, are never found. ``vectors`` stays row for row with the
    table (zeros where none), for designs that score the rows read with it.
    """

    def __init__(self, dim: int, *, index: str = "auto", device: torch.device | str = "cpu") -> None:
        if index not in TEXT_INDEXES:
            raise ConfigError(f"text index must be one of {', '.join(TEXT_INDEXES)}, got {index!r}")
        self.index = index
        self.vectors = torch.zeros(0, dim, device=device)
        self.live = torch.zeros(0, dtype=torch.bool, device=device)
        self._faiss = None  # a FaissIndex labelled by row, once index (or size) asks for one

    def __len__(self) -> int:
        return int(self.live.sum())

    @property
    def uses_faiss(self) -> bool:
        return self._faiss is not None

    def to(self, device: torch.device | str) -> TextIndex:
        self.vectors, self.live = self.vectors.to(device), self.live.to(device)
        return self

    def grow(self, n: int) -> None:
        """Make room for rows up to ``n`` (new rows: no vector, never found)."""
        if n > len(self.vectors):
            extra = n - len(self.vectors)
            self.vectors = torch.cat([self.vectors, self.vectors.new_zeros(extra, self.vectors.shape[1])])
            self.live = torch.cat([self.live, self.live.new_zeros(extra)])

    def set(self, rows: Tensor, vectors: Tensor) -> None:
        """Install (or replace) the vectors (n, E) of ``rows``."""
        if not len(rows):
            return
        rows = rows.to(self.vectors.device, torch.long)
        self.grow(int(rows.max()) + 1)
        self.vectors[rows] = vectors.to(self.vectors.device, torch.float32)
        self.live[rows] = True
        if self._faiss is not None:
            self._faiss.add(rows.cpu().numpy(), self.vectors[rows].cpu().numpy())  # replaces these rows
        elif self.index == "faiss" or (self.index == "auto" and len(self) >= TEXT_FAISS_FROM):
            from memlm.index.faiss_index import FaissIndex

            live = self.live.nonzero().squeeze(1)
            self._faiss = FaissIndex(dim=self.vectors.shape[1], spec="auto")
            self._faiss.add(live.cpu().numpy(), self.vectors[live].cpu().numpy(), replace=False)

    def remove(self, rows: Tensor) -> None:
        """Rows that are gone (a deleted entry): never found again, their vectors zeroed."""
        rows = rows.to(self.vectors.device, torch.long)
        rows = rows[rows < len(self.vectors)]
        if not len(rows):
            return
        self.vectors[rows], self.live[rows] = 0.0, False
        if self._faiss is not None:
            self._faiss.remove(rows.cpu().numpy())

    @torch.no_grad()
    def search(self, queries: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Embeddings (Q, E) -> (similarities, rows), each (Q, n), best first; -inf and -1 past the live rows."""
        if self._faiss is not None:
            scores, rows = self._faiss.search(queries.detach().float().cpu().numpy(), n)
            return torch.from_numpy(scores).to(queries.device), torch.from_numpy(rows).to(queries.device)
        sims = (queries.float() @ self.vectors.T).masked_fill(~self.live, float("-inf"))
        top, rows = sims.topk(min(n, sims.shape[1]), dim=-1)
        rows = rows.masked_fill(~torch.isfinite(top), -1)
        if top.shape[1] < n:  # fewer rows than n: pad
            pad = n - top.shape[1]
            top, rows = F.pad(top, (0, pad), value=float("-inf")), F.pad(rows, (0, pad), value=-1)
        return top, rows


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
