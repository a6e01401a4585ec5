"""FAISS indexes built with ``index_factory`` (Flat, IVF, HNSW, PQ), editable in place.

Flat and PQ are wrapped in ``IndexIDMap2``, so faiss labels are bank ids and ``remove_ids`` works; IVF indexes
store the ids in their inverted lists natively (same labels, and removal without IDMap2's hash-map rebuild).
HNSW graphs cannot remove nodes in FAISS, so an HNSW shard keeps a slot -> id array and tombstones: a removed
slot is excluded at search time with an ``IDSelector`` (never returned), and the shard is rebuilt from its
live vectors (one bulk ``reconstruct_n`` copy) when tombstones pass a quarter of it, or on purge (``compact``).
IVF-PQ with ``rerank`` labels its codes with slots too, and keeps the full vectors by slot to re-score the
``rerank * k`` candidates of each query exactly.

Defaults by shard size (``spec="auto"``, decided at a shard's first add):
  n < 50k   -> "Flat"                      exact; 50k x 384-d is ~2 ms per query
  n < 4M    -> "IVF{~4 sqrt n},Flat"        nprobe 32: ~1/64 of the vectors scanned per query
  otherwise -> "IVF{~4 sqrt n},PQ{d/8}"     fits in memory; recall limited by PQ (see docs/bank.md)
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from memlm.index.base import IndexFileError, ShardedIndex


def _faiss():
    # sys.modules lookup, not a try/import per call: this runs on every query (the 1 ms budget)
    faiss = sys.modules.get("faiss")
    if faiss is None:
        try:
            import faiss
        except ImportError:
            raise IndexFileError("FAISS indexes need: pip install faiss-cpu") from None
    return faiss


def auto_spec(n: int, dim: int) -> str:
    """The factory string memlm picks for a shard of n vectors (see module docstring)."""
    if n < 50_000:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    if n < 4_000_000:
        return f"IVF{nlist},Flat"
    m = max(m for m in (8, 16, 24, 32, 48, 64, 96) if dim % m == 0 and m <= dim // 4)
    return f"IVF{nlist},PQ{m}"


def _needs_training(spec: str) -> int:
    """Minimum training vectors (FAISS wants ~39 per centroid); 0 if untrained."""
    head = spec.split(",")[0]
    if head.startswith("IVF"):
        return 39 * int("".join(c for c in head[3:] if c.isdigit()) or 1)
    if "PQ" in spec:
        return 256 * 39 // 10
    return 0


def _grow(arr: np.ndarray, need: int) -> np.ndarray:
    """Capacity doubling: appending one edit must not copy the whole shard."""
    if need <= len(arr):
        return arr
    out = np.zeros((max(need, 2 * len(arr), 1024), *arr.shape[1:]), arr.dtype)
    out[: len(arr)] = arr
    return out


class FaissShard:
    """One namespace's FAISS index.

    "Slotted" shards (HNSW, and IVF-PQ with ``rerank``) label FAISS rows with a slot number and keep
    slot -> bank id and alive flags in numpy arrays: HNSW cannot remove nodes (a removed slot is a tombstone,
    excluded by an ``IDSelector`` and dropped at the next rebuild), and re-ranking needs the slot to find the
    full vector of a candidate in ``_full`` without a per-id dictionary.
    """

    def __init__(
        self, dim: int, spec: str, *, nprobe: int, ef_search: int, ef_construction: int, rerank: int = 0
    ) -> None:
        self.dim, self.spec = dim, spec
        self.nprobe, self.ef_search, self.ef_construction, self.rerank = (
            nprobe,
            ef_search,
            ef_construction,
            rerank,
        )
        self.index = None  # built at the first add (spec "auto" looks at its size)
        self.built_spec = ""
        self.hnsw = False
        self.native_ids = False  # IVF: ids live in the inverted lists
        self.reranked = False  # IVF-PQ candidates re-scored exactly with the full vectors in _full
        self._n = 0  # slots used (slotted shards)
        self._slot_ids = np.zeros(0, np.int64)  # slot -> bank id
        self._alive = np.zeros(0, bool)
        self._full = np.zeros((0, dim), np.float32)  # reranked only: slot -> full vector
        # HNSW search parameters with the tombstone selector, built once per change of the dead set, not per
        # query (finding the dead slots is O(N): ~1 ms at 1M entries)
        self._params: tuple | None = None

    @property
    def slotted(self) -> bool:
        return self.hnsw or self.reranked

    # ---------------------------------------------------------------- build
    def _build(self, vectors: np.ndarray) -> None:
        faiss = _faiss()
        spec = auto_spec(len(vectors), self.dim) if self.spec == "auto" else self.spec
        # "np": skip polysemous training, which only serves Hamming filtering and costs ~10x the PQ training time
        spec = re.sub(r"(PQ\d+(?:x\d+)?)(?![\dxn])", r"\1np", spec)
        if len(vectors) < _needs_training(spec):
            spec = "Flat"  # too few vectors to train centroids/codebooks: exact is both better and cheap
        self.built_spec = spec
        self._set_kind()
        if self.hnsw or self.native_ids:
            # IVF lists store the ids themselves and remove them in place: an IDMap2 wrapper on top would
            # rebuild its 1M-entry id hash map on every remove (~150 ms per edit at 1M entries).
            self.index = faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
            if self.hnsw:
                self.index.hnsw.efConstruction = self.ef_construction
        else:
            self.index = faiss.index_factory(self.dim, "IDMap2," + spec, faiss.METRIC_INNER_PRODUCT)
        if not self.index.is_trained:
            rng = np.random.default_rng(0)
            sample = (
                vectors
                if len(vectors) <= 100_000
                else vectors[rng.choice(len(vectors), 100_000, replace=False)]
            )
            self.index.train(sample)
        self._apply_params()

    def _set_kind(self) -> None:
        self.hnsw = self.built_spec.startswith("HNSW")
        self.native_ids = self.built_spec.startswith("IVF")
        self.reranked = self.native_ids and "PQ" in self.built_spec and self.rerank > 0

    def _apply_params(self) -> None:
        faiss = _faiss()
        ps = faiss.ParameterSpace()
        self._params = None
        if "IVF" in self.built_spec:
            ps.set_index_parameter(self.index, "nprobe", self.nprobe)
        if self.hnsw:
            self.index.hnsw.efSearch = self.ef_search

    # ---------------------------------------------------------------- edits
    def __len__(self) -> int:
        if self.index is None:
            return 0
        return int(self._alive[: self._n].sum()) if self.slotted else int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.index is None:
            self._build(vectors)
        if not self.slotted:
            self.index.add_with_ids(vectors, ids)
            return
        n, m = self._n, len(ids)
        slots = np.arange(n, n + m, dtype=np.int64)
        if self.hnsw:
            self.index.add(vectors)  # HNSW labels are its row numbers = our slots
        else:
            self.index.add_with_ids(vectors, slots)
            self._full = _grow(self._full, n + m)
            self._full[n : n + m] = vectors
        self._slot_ids, self._alive = _grow(self._slot_ids, n + m), _grow(self._alive, n + m)
        self._slot_ids[n : n + m], self._alive[n : n + m] = ids, True
        self._n += m

    def remove(self, ids: np.ndarray) -> int:
        if self.index is None:
            return 0
        if not self.slotted:
            return int(self.index.remove_ids(_faiss().IDSelectorBatch(ids)))
        hit = np.flatnonzero(np.isin(self._slot_ids[: self._n], ids) & self._alive[: self._n])
        self._alive[hit] = False
        if len(hit):
            self._params = None
        if self.reranked and len(hit):
            self.index.remove_ids(_faiss().IDSelectorBatch(hit))
            self._full[hit] = 0  # the vector leaves memory (and the next save) with the entry
        if self.hnsw and (~self._alive[: self._n]).sum() > self._n // 4:
            self.compact()
        return len(hit)

    def compact(self) -> None:
        """Drop removed entries physically (HNSW: rebuild the graph from its live vectors, vectorised)."""
        if not self.hnsw or self._alive[: self._n].all():
            return
        live = np.flatnonzero(self._alive[: self._n])
        # one bulk copy out of the graph's storage, not a reconstruct() call per slot
        vecs = (
            self.index.reconstruct_n(0, self._n)[live] if len(live) else np.zeros((0, self.dim), np.float32)
        )
        ids = self._slot_ids[live]
        self.index, self._n, self._params = None, 0, None
        self._slot_ids, self._alive = np.zeros(0, np.int64), np.zeros(0, bool)
        if len(ids):
            self.add(ids, vecs)

    # ---------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if not self.slotted:
            return self.index.search(queries, k)
        if self.reranked:
            kk = k * self.rerank
            _, slots = self.index.search(queries, kk)  # (B, kk) approximate candidates
            cand = self._full[np.maximum(slots, 0)]  # (B, kk, d)
            exact = np.einsum("bkd,bd->bk", cand, queries)
            exact[slots < 0] = -np.inf
            top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            scores, slots = np.take_along_axis(exact, top, 1), np.take_along_axis(slots, top, 1)
        else:
            if self._params is None or self._params[0] != k:
                params = faiss.SearchParametersHNSW()
                params.efSearch = max(self.ef_search, k)
                dead = np.flatnonzero(~self._alive[: self._n]).astype(np.int64)
                refs = ()
                if len(dead):
                    # the selectors stay referenced with the params (SWIG does not own them)
                    refs = (faiss.IDSelectorBatch(dead),)
                    refs += (faiss.IDSelectorNot(refs[0]),)
                    params.sel = refs[1]
                self._params = (k, params, refs)
            scores, slots = self.index.search(queries, k, params=self._params[1])
        ids = np.where(slots >= 0, self._slot_ids[np.maximum(slots, 0)], -1)
        return scores, ids

    def ids(self) -> np.ndarray:
        if self.index is None:
            return np.zeros(0, np.int64)
        if self.slotted:
            return np.sort(self._slot_ids[: self._n][self._alive[: self._n]])
        faiss = _faiss()
        if self.native_ids:
            ivf = faiss.extract_index_ivf(self.index)
            inv = ivf.invlists
            parts = [faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy() for i in range(ivf.nlist)]
            return np.sort(np.concatenate(parts).astype(np.int64)) if parts else np.zeros(0, np.int64)
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    # ---------------------------------------------------------------- files
    def save(self, folder: Path) -> None:
        faiss = _faiss()
        (folder / "shard.json").write_text(json.dumps({"built_spec": self.built_spec}))
        if self.index is None:
            return
        faiss.write_index(self.index, str(folder / "index.faiss"))
        if self.slotted:
            np.save(folder / "slot_ids.npy", self._slot_ids[: self._n])
            np.save(folder / "alive.npy", self._alive[: self._n])
        if self.reranked:
            np.save(folder / "full.npy", self._full[: self._n])

    def load(self, folder: Path) -> FaissShard:
        faiss = _faiss()
        self.built_spec = json.loads((folder / "shard.json").read_text())["built_spec"]
        if not self.built_spec:
            return self
        self.index = faiss.read_index(str(folder / "index.faiss"))
        if self.index.d != self.dim:
            raise IndexFileError(f"{folder}: index has dim {self.index.d}, manifest says {self.dim}")
        self._set_kind()
        self.reranked = self.native_ids and (folder / "full.npy").exists()
        if self.slotted:
            self._slot_ids = np.load(folder / "slot_ids.npy", allow_pickle=False)
            self._alive = np.load(folder / "alive.npy", allow_pickle=False)
            self._n = len(self._slot_ids)
            rows = self.index.ntotal if self.hnsw else int(self._alive.sum())
            if len(self._alive) != self._n or (self.hnsw and self._n != rows):
                raise IndexFileError(
                    f"{folder}: slot map does not match the index ({self.index.ntotal} rows)"
                )
        if self.reranked:
            self._full = np.load(folder / "full.npy", allow_pickle=False)
            if self._full.shape != (self._n, self.dim):
                raise IndexFileError(
                    f"{folder}: re-rank vectors of shape {self._full.shape}, expected ({self._n}, {self.dim})"
                )
        self._apply_params()
        return self


class FaissIndex(ShardedIndex):
    """FAISS per namespace. ``spec``: an index_factory string ("Flat", "IVF1024,Flat", "HNSW32", "IVF1024,PQ48")
    or "auto". ``nprobe`` (IVF lists scanned) and ``ef_search`` (HNSW beam) trade recall for speed;
    ``rerank`` (IVF-PQ only): re-score ``rerank * k`` compressed-code candidates with the full vectors, which
    lifts PQ's recall to that of its candidate list at the cost of 4·d bytes per entry."""

    kind = "faiss"

    def __init__(
        self,
        *,
        dim: int,
        spec: str = "auto",
        nprobe: int = 32,
        ef_search: int = 64,
        ef_construction: int = 40,
        rerank: int = 0,
    ) -> None:
        super().__init__(dim=dim)
        self.spec, self.nprobe, self.ef_search = spec, nprobe, ef_search
        self.ef_construction, self.rerank = ef_construction, rerank

    @property
    def params(self) -> dict:
        return {
            "spec": self.spec,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "ef_construction": self.ef_construction,
            "rerank": self.rerank,
        }

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the speed/recall trade-off of every shard without rebuilding."""
        self.nprobe = nprobe or self.nprobe
        self.ef_search = ef_search or self.ef_search
        for s in self.shards.values():
            s.nprobe, s.ef_search = self.nprobe, self.ef_search
            if s.index is not None:
                s._apply_params()

    def _new_shard(self) -> FaissShard:
        return FaissShard(
            self.dim,
            self.spec,
            nprobe=self.nprobe,
            ef_search=self.ef_search,
            ef_construction=self.ef_construction,
            rerank=self.rerank,
        )

    def _load_shard(self, folder: Path) -> FaissShard:
        return self._new_shard().load(folder)
