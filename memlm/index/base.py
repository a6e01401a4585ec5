"""The one retrieval protocol, and namespace sharding shared by every vector index.

``search(queries (B, d) float32, k, namespaces=None) -> (scores (B, k) float32, ids (B, k) int64)``;
ids are bank entry ids, ``-1`` (score ``-inf``) pads rows with fewer than k hits. Scores are inner
products (the encoders give unit vectors, so cosine).

Why shards: each namespace gets its own sub-index, and a scoped query only searches the shards it names.
An entry of another namespace is then not just filtered out afterwards; it is never a candidate, and a small
namespace keeps full recall next to a huge one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from memlm.bank.entry import DEFAULT_NAMESPACE
from memlm.errors import InputError, MemlmError

INDEX_FORMAT_VERSION = 1


class IndexFileError(MemlmError):
    """A corrupt, incompatible or missing index file."""


@runtime_checkable
class VectorIndex(Protocol):
    dim: int

    def add(self, ids: np.ndarray, vectors: np.ndarray, namespaces: Sequence[str] | None = None) -> None: ...
    def remove(self, ids: np.ndarray) -> int: ...
    def search(
        self, queries: np.ndarray, k: int, namespaces: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def save(self, path: str | os.PathLike) -> None: ...


class Shard(Protocol):
    """What a single-namespace index implements; :class:`ShardedIndex` does the rest."""

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...
    def remove(self, ids: np.ndarray) -> int: ...
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def ids(self) -> np.ndarray: ...
    def __len__(self) -> int: ...
    def save(self, folder: Path) -> None: ...


def check_vectors(vectors: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """(N, dim) float32 C-contiguous, or an InputError naming the shape."""
    v = np.asarray(vectors)
    if v.ndim == 1 and v.shape[0] == dim:
        v = v[None]
    if v.ndim != 2 or v.shape[1] != dim:
        raise InputError(f"{what} have shape {tuple(v.shape)}, this index expects (N, {dim})")
    if not np.isfinite(v).all():
        raise InputError(f"{what} contain NaN or infinite values")
    return np.ascontiguousarray(v, dtype=np.float32)


def merge_topk(
    parts: list[tuple[np.ndarray, np.ndarray]], k: int, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Combine per-shard (scores, ids) into the global top-k, padded with (-inf, -1)."""
    if not parts:
        return np.full((batch, k), -np.inf, np.float32), np.full((batch, k), -1, np.int64)
    if len(parts) == 1 and parts[0][1].shape[1] == k:
        # one shard (the common case): its rows are already sorted best first, so only mark the padding
        scores, ids = parts[0]
        return np.where(ids < 0, -np.inf, scores).astype(np.float32, copy=False), ids.astype(
            np.int64, copy=False
        )
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1).astype(np.int64)


class ShardedIndex:
    """Namespace -> shard. Subclasses define ``kind``, ``_new_shard()``, ``_load_shard(folder)`` and ``params``."""

    kind = "base"

    def __init__(self, *, dim: int) -> None:
        self.dim = int(dim)
        self.shards: dict[str, Shard] = {}
        # bookkeeping for memlm.index.retriever: which bank version and encoder these vectors come from
        self.meta: dict = {}

    @property
    def params(self) -> dict:
        return {}

    def _new_shard(self) -> Shard:
        raise NotImplementedError

    def _load_shard(self, folder: Path) -> Shard:
        raise NotImplementedError

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards.values())

    def add(
        self,
        ids: np.ndarray,
        vectors: np.ndarray,
        namespaces: Sequence[str] | None = None,
        *,
        replace: bool = True,
    ) -> None:
        """Add (N,) int64 ids with (N, dim) vectors; ``namespaces`` is one name per row (default "default").

        An id already present is replaced, so add after an edit is always safe; ``replace=False`` skips
        that removal pass when the caller has just removed these ids.
        """
        vectors = check_vectors(vectors, self.dim)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(vectors):
            raise InputError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) == 0:
            return
        if (ids < 0).any():
            raise InputError("ids must be >= 0 (-1 is the padding id)", field="id")
        if replace:
            self.remove(ids)
        ns = np.asarray(
            [DEFAULT_NAMESPACE] * len(ids) if namespaces is None else list(namespaces), dtype=object
        )
        if len(ns) != len(ids):
            raise InputError(f"{len(ns)} namespaces for {len(ids)} ids")
        for name in dict.fromkeys(ns.tolist()):
            sel = ns == name
            if name not in self.shards:
                self.shards[name] = self._new_shard()
            self.shards[name].add(ids[sel], vectors[sel])

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids from every shard (an edit may have moved an entry between namespaces)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return sum(s.remove(ids) for s in self.shards.values()) if len(ids) else 0

    def search(
        self, queries: np.ndarray, k: int, namespaces: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the named namespaces (all when None). queries (B, dim) -> scores, ids (B, k)."""
        queries = check_vectors(queries, self.dim, "queries")
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}", field="k")
        names = (
            list(self.shards)
            if namespaces is None
            else [n for n in dict.fromkeys(namespaces) if n in self.shards]
        )
        parts = [self.shards[n].search(queries, k) for n in names if len(self.shards[n])]
        return merge_topk(parts, k, len(queries))

    def ids(self) -> np.ndarray:
        parts = [s.ids() for s in self.shards.values()]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index folder atomically: manifest.json + one sub-folder per namespace shard."""
        from memlm.utils.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.mkdir()
            names = {}
            for i, (ns, shard) in enumerate(self.shards.items()):
                sub = tmp / f"shard{i:04d}"
                sub.mkdir()
                shard.save(sub)
                names[ns] = sub.name
            manifest = {
                "format_version": INDEX_FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
                "params": self.params, "shards": names, "meta": self.meta,
            }  # fmt: skip
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))

    @classmethod
    def _from_manifest(cls, manifest: dict) -> ShardedIndex:
        return cls(dim=manifest["dim"], **manifest["params"])
