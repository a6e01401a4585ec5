"""FAISS indexes built with ``index_factory`` (Flat, IVF, HNSW, PQ), editable in place.

Flat and PQ are wrapped in ``IndexIDMap2``, so faiss labels are bank ids and ``remove_ids`` works; IVF indexes
store the ids in their inverted lists natively (same labels, and removal without IDMap2's hash-map rebuild).
HNSW graphs cannot remove nodes in FAISS, so an HNSW shard keeps a slot -> id array and tombstones: a removed
slot is excluded at search time with an ``IDSelector`` (never returned), and the shard is rebuilt from its
live vectors when tombstones pass a quarter of it.

Defaults by shard size (``spec="auto"``, decided at a shard's first add):
  n < 50k   -> "Flat"                      exact; 50k x 384-d is ~2 ms per query
  n < 4M    -> "IVF{~4 sqrt n},Flat"        nprobe 32: ~1/64 of the vectors scanned per query
  otherwise -> "IVF{~4 sqrt n},PQ{d/8}"     fits in memory; recall limited by PQ (see docs/bank.md)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from memlm.index.base import IndexFileError, ShardedIndex


def _faiss():
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


class FaissShard:
    def __init__(self, dim: int, spec: str, *, nprobe: int, ef_search: int, ef_construction: int) -> None:
        self.dim, self.spec = dim, spec
        self.nprobe, self.ef_search, self.ef_construction = nprobe, ef_search, ef_construction
        self.index = None  # built at the first add (spec "auto" looks at its size)
        self.built_spec = ""
        self.hnsw = False
        self.native_ids = False  # IVF: ids live in the inverted lists
        self._slot_ids = np.zeros(0, np.int64)  # HNSW only: faiss label (slot) -> bank id
        self._alive = np.zeros(0, bool)

    # ---------------------------------------------------------------- build
    def _build(self, vectors: np.ndarray) -> None:
        faiss = _faiss()
        spec = auto_spec(len(vectors), self.dim) if self.spec == "auto" else self.spec
        # "np": skip polysemous training, which only serves Hamming filtering and costs ~10x the PQ training time
        spec = re.sub(r"(PQ\d+(?:x\d+)?)(?![\dxn])", r"\1np", spec)
        if len(vectors) < _needs_training(spec):
            spec = "Flat"  # too few vectors to train centroids/codebooks: exact is both better and cheap
        self.built_spec = spec
        self.hnsw = spec.startswith("HNSW")
        self.native_ids = spec.startswith("IVF")
        if self.hnsw:
            self.index = faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = self.ef_construction
        elif self.native_ids:
            # IVF lists store the ids themselves and remove them in place: an IDMap2 wrapper on top would
            # rebuild its 1M-entry id hash map on every remove (~150 ms per edit at 1M entries).
            self.index = faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
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

    def _apply_params(self) -> None:
        faiss = _faiss()
        ps = faiss.ParameterSpace()
        if "IVF" in self.built_spec:
            ps.set_index_parameter(self.index, "nprobe", self.nprobe)
        if self.hnsw:
            self.index.hnsw.efSearch = self.ef_search

    # ---------------------------------------------------------------- edits
    def __len__(self) -> int:
        if self.index is None:
            return 0
        return int(self._alive.sum()) if self.hnsw else int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.index is None:
            self._build(vectors)
        if self.hnsw:
            self.index.add(vectors)
            self._slot_ids = np.concatenate([self._slot_ids, ids])
            self._alive = np.concatenate([self._alive, np.ones(len(ids), bool)])
        else:
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        if self.index is None:
            return 0
        if not self.hnsw:
            return int(self.index.remove_ids(_faiss().IDSelectorBatch(ids)))
        hit = np.isin(self._slot_ids, ids) & self._alive
        self._alive[hit] = False
        if (~self._alive).sum() > len(self._alive) // 4:
            self._rebuild_hnsw()
        return int(hit.sum())

    def _rebuild_hnsw(self) -> None:
        live = np.nonzero(self._alive)[0]
        vecs = (
            np.vstack([self.index.reconstruct(int(s)) for s in live])
            if len(live)
            else np.zeros((0, self.dim), np.float32)
        )
        ids = self._slot_ids[live]
        self.index, self._slot_ids, self._alive = None, np.zeros(0, np.int64), np.zeros(0, bool)
        if len(ids):
            self.add(ids, vecs)

    # ---------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if not self.hnsw:
            return self.index.search(queries, k)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, k)
        dead = np.nonzero(~self._alive)[0].astype(np.int64)
        if len(dead):
            # keep the selector objects referenced until search returns (SWIG does not own them)
            batch = faiss.IDSelectorBatch(dead)
            params.sel = sel = faiss.IDSelectorNot(batch)
        scores, slots = self.index.search(queries, k, params=params)
        if len(dead):
            del sel, batch
        ids = np.where(slots >= 0, self._slot_ids[np.maximum(slots, 0)], -1)
        return scores, ids

    def ids(self) -> np.ndarray:
        if self.index is None:
            return np.zeros(0, np.int64)
        if self.hnsw:
            return self._slot_ids[self._alive].copy()
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
        if self.hnsw:
            np.save(folder / "slot_ids.npy", self._slot_ids)
            np.save(folder / "alive.npy", self._alive)

    def load(self, folder: Path) -> FaissShard:
        faiss = _faiss()
        self.built_spec = json.loads((folder / "shard.json").read_text())["built_spec"]
        if not self.built_spec:
            return self
        self.index = faiss.read_index(str(folder / "index.faiss"))
        if self.index.d != self.dim:
            raise IndexFileError(f"{folder}: index has dim {self.index.d}, manifest says {self.dim}")
        self.hnsw = self.built_spec.startswith("HNSW")
        self.native_ids = self.built_spec.startswith("IVF")
        if self.hnsw:
            self._slot_ids = np.load(folder / "slot_ids.npy", allow_pickle=False)
            self._alive = np.load(folder / "alive.npy", allow_pickle=False)
            if len(self._slot_ids) != self.index.ntotal or len(self._alive) != self.index.ntotal:
                raise IndexFileError(
                    f"{folder}: slot map does not match the HNSW graph ({self.index.ntotal} nodes)"
                )
        self._apply_params()
        return self


class FaissIndex(ShardedIndex):
    """FAISS per namespace. ``spec``: an index_factory string ("Flat", "IVF1024,Flat", "HNSW32", "IVF1024,PQ48")
    or "auto". ``nprobe`` (IVF lists scanned) and ``ef_search`` (HNSW beam) trade recall for speed."""

    kind = "faiss"

    def __init__(
        self,
        *,
        dim: int,
        spec: str = "auto",
        nprobe: int = 32,
        ef_search: int = 64,
        ef_construction: int = 40,
    ) -> None:
        super().__init__(dim=dim)
        self.spec, self.nprobe, self.ef_search, self.ef_construction = (
            spec,
            nprobe,
            ef_search,
            ef_construction,
        )

    @property
    def params(self) -> dict:
        return {
            "spec": self.spec,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "ef_construction": self.ef_construction,
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
        )

    def _load_shard(self, folder: Path) -> FaissShard:
        return self._new_shard().load(folder)
