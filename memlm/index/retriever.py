"""Retriever: a bank, an encoder and a vector index kept in step with the bank's edits.

The index records the bank version it reflects and is saved under ``<bank>/indexes/<name>/``
(:meth:`Retriever.open_or_build`), so only the first search of a bank builds it. ``refresh()`` (called before every search) reads the ids the
log says changed since then, re-encodes only those (the vector cache is keyed by content hash), removes
them from the index and re-adds the ones that still exist. So an edit is visible to the next search, and a
deleted entry can never be returned. A saved index whose encoder fingerprint differs is rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from memlm.bank.entry import Entry
from memlm.bank.store import MemoryBank
from memlm.bank.vectors import VectorCache
from memlm.encode.base import Encoder
from memlm.index.base import IndexFileError, ShardedIndex
from memlm.index.kinds import KINDS, load_index

# Past this fraction of the bank changed, re-adding everything is cheaper than incremental edits.
_REBUILD_FRACTION = 0.3
# Grown past this factor since its build (plus _GROWTH_SLACK entries), an index is rebuilt from the bank: what
# it learned at its build (IVF centroids, PQ codebooks, or no training at all when the bank was too small for
# it, so "Flat") describes a bank it no longer is. O(N) after O(N) adds: O(1) per add, amortised.
_GROWTH = 2.0
_GROWTH_SLACK = 1000


@dataclass(frozen=True)
class Hit:
    score: float
    entry: Entry


def index_dir(bank: MemoryBank, name: str) -> Path:
    return bank.path / "indexes" / name


def default_name(kind: str, encoder: Encoder, key: str = "text") -> str:
    """``<kind>-<encoder name>[-<key>]``: one saved index per kind, encoder family and vector key (the exact
    fingerprint is in its meta, and a saved index of another fingerprint is rebuilt on open)."""
    return f"{kind}-{encoder.fingerprint.split(':')[0]}" + ("" if key == "text" else f"-{key}")


class Retriever:
    """Search a bank by text or vector. ``kind``: "exact" | "faiss" | "pk"; ``params`` go to the index class."""

    def __init__(self, bank: MemoryBank, encoder: Encoder, index: ShardedIndex, *, key: str = "text") -> None:
        self.bank, self.encoder, self.index = bank, encoder, index
        self.cache = VectorCache(
            bank, encoder, key=key
        )  # key: what of an entry is encoded (bank.vectors.KEYS)
        self.dirty = False  # the in-memory index differs from what is saved (save() to keep it)
        self.name: str | None = None  # the saved index this one was opened from or saved as
        self.rebuilds = 0  # full builds from the bank's vectors done by this object (refresh is incremental)

    @classmethod
    def build(
        cls,
        bank: MemoryBank,
        encoder: Encoder,
        *,
        kind: str = "exact",
        key: str = "text",
        progress: bool = False,
        **params,
    ) -> Retriever:
        """Encode what is missing and build the index from every entry's vector (the bank is the source)."""
        if kind not in KINDS:
            raise IndexFileError(f"unknown index kind {kind!r} (known: {', '.join(KINDS)})")
        index = KINDS[kind](dim=encoder.dim, **params)
        self = cls(bank, encoder, index, key=key)
        self._rebuild(progress=progress)
        return self

    def _rebuild(self, *, progress: bool = False) -> None:
        version = self.bank.version
        self.cache.sync(progress=progress)
        n = self.cache.count()
        ids = np.empty(n, np.int64)
        vecs = np.empty((n, self.encoder.dim), np.float32)
        namespaces: list[str] = []
        i = 0
        for bid, bvec, bns in tqdm(self.cache.iter_all(), desc="load vectors", disable=not progress):
            m = min(len(bid), n - i)  # entries added meanwhile are picked up by the next refresh
            ids[i : i + m], vecs[i : i + m] = bid[:m], bvec[:m]
            namespaces += bns[:m]
            i += m
        self.index.shards.clear()
        self.index.add(ids[:i], vecs[:i], namespaces, replace=False)
        self.index.meta = {
            "bank_version": version,
            "fingerprint": self.cache.fingerprint,
            "kind": self.index.kind,
            "built_on": i,  # entries at this build (see _GROWTH)
        }
        self.dirty = True
        self.rebuilds += 1

    @classmethod
    def open(cls, bank: MemoryBank, encoder: Encoder, *, name: str, key: str = "text") -> Retriever:
        """Load the index saved as ``name`` in the bank folder and bring it up to date."""
        index = load_index(index_dir(bank, name))
        self = cls(bank, encoder, index, key=key)
        if index.meta.get("fingerprint") != self.cache.fingerprint or index.dim != encoder.dim:
            # vectors from another encoder/checkpoint/key are invalid here: same kind and settings, rebuilt
            self = cls(bank, encoder, type(index)(dim=encoder.dim, **index.params), key=key)
            self._rebuild()
        else:
            self.refresh()
        self.name = name
        return self

    @classmethod
    def open_or_build(
        cls,
        bank: MemoryBank,
        encoder: Encoder,
        *,
        kind: str = "exact",
        key: str = "text",
        name: str | None = None,
        progress: bool = False,
        **params,
    ) -> Retriever:
        """The index saved as ``name`` (default :func:`default_name`), refreshed from the edit log; built and
        saved if there is none (or it is unreadable). What readers of a bank should call: only the first call
        pays for a build. A saved index keeps the settings it was built with (``params`` apply to a build);
        call :meth:`save` after searches to keep the refreshed index (``dirty``)."""
        name = name or default_name(kind, encoder, key)
        try:
            self = cls.open(bank, encoder, name=name, key=key)
        except IndexFileError:
            self = cls.build(bank, encoder, kind=kind, key=key, progress=progress, **params)
            self.name = name
        if self.dirty and not bank.readonly:
            self.save(name)
        return self

    def save(self, name: str) -> Path:
        path = index_dir(self.bank, name)
        self.index.save(path)
        self.dirty, self.name = False, name
        return path

    def refresh(self) -> int:
        """Apply the bank's edits since the index was built. Returns the number of entries re-indexed."""
        version = self.bank.version
        since = self.index.meta.get("bank_version", -1)
        if version == since:
            return 0
        changed = self.bank.changed_since(since)
        if len(changed) > _REBUILD_FRACTION * max(len(self.index), 1) + 1000:
            self._rebuild()
            return len(changed)
        self.cache.sync(changed)
        self.index.remove(np.asarray(changed, np.int64))
        ids, vecs, namespaces = self.cache.fetch(changed)
        self.index.add(ids, vecs, namespaces, replace=False)
        self.index.meta["bank_version"] = version
        self.dirty = True
        built_on = self.index.meta.setdefault("built_on", len(self.index))
        if len(self.index) > _GROWTH * built_on + _GROWTH_SLACK:
            self._rebuild()
        return len(changed)

    def search(
        self, queries: Sequence[str] | np.ndarray, k: int = 10, namespaces: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Texts or (B, dim) vectors -> (scores (B, k), ids (B, k) int64, -1 = no hit), after a refresh."""
        self.refresh()
        if not isinstance(queries, np.ndarray):
            queries = self.encoder.encode(list(queries))
        return self.index.search(queries, k, namespaces)

    def search_entries(
        self, queries: Sequence[str] | np.ndarray, k: int = 10, namespaces: Sequence[str] | None = None
    ) -> list[list[Hit]]:
        """Like :meth:`search` but returns the entries; one that vanished meanwhile is dropped."""
        scores, ids = self.search(queries, k, namespaces)
        entries = self.bank.get_many([int(i) for i in ids.ravel() if i >= 0], missing_ok=True)
        by_id = {e.id: e for e in entries if e is not None}
        allowed = set(namespaces) if namespaces is not None else None
        return [
            [Hit(float(s), by_id[int(i)]) for s, i in zip(srow, irow)
             if int(i) in by_id and (allowed is None or by_id[int(i)].namespace in allowed)]
            for srow, irow in zip(scores, ids)
        ]  # fmt: skip
