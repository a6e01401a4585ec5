"""Product-key index: two sub-codebooks learned from the entries' own vectors (Lample et al. 2019; ExplicitLM).

Each vector is split in halves; each half has K = ceil(sqrt(N)) centroids learned by spherical k-means on the
entries' halves, so an entry's cell (c1, c2) is derived from its content, and an edited entry is re-placed
(ExplicitLM's keys ignore content, so its edits never change routing). Search: top-``topk_half`` centroids per
half, their cartesian product ranked by the sum of half scores, the best ``n_cells`` cells gathered, and their
entries rescored exactly with the full vectors.

The codebooks follow the bank: they are learned again (and every entry re-placed) once the rows added since
they were learned outnumber the rows they were learned on — the shard has doubled (K grows by sqrt 2), or as
many entries were edited or replaced as it held. Without this, a bank grown from one entry would stay one cell
(brute force) forever, and a drifted one would crowd its new content into a few cells. Each re-learning
costs O(N) and happens after O(N) adds, so O(1) per add amortised.

Cells are found through a sorted cell array plus a small unsorted tail of recent adds, merged when it grows,
so a single edit costs O(tail), not a re-sort of the whole shard.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from memlm.index.base import IndexFileError, ShardedIndex

_TAIL_MAX = 20_000


def _kmeans(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(k, d) unit centroids by spherical k-means (FAISS), on at most 64 points per centroid."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) > 64 * k:
        x = x[np.random.default_rng(seed).choice(len(x), 64 * k, replace=False)]
    if len(x) <= k:
        c = np.zeros((k, x.shape[1]), np.float32)
        c[: len(x)] = x
        return c
    km = faiss.Kmeans(
        x.shape[1], k, niter=12, spherical=True, seed=seed, verbose=False, min_points_per_centroid=1
    )
    km.train(x)
    return km.centroids.astype(np.float32)


class ProductKeyShard:
    def __init__(self, dim: int, *, topk_half: int, n_cells: int, cell_size: int) -> None:
        self.dim, self.h = dim, dim // 2
        self.topk_half, self.n_cells, self.cell_size = topk_half, n_cells, cell_size
        self.c1: np.ndarray | None = None  # (K, h) sub-keys of the first half
        self.c2: np.ndarray | None = None  # (K, dim - h)
        self._ids = np.zeros(0, np.int64)
        self._vecs = np.zeros((0, dim), np.float32)
        self._cells = np.zeros(0, np.int64)
        self._alive = np.zeros(0, bool)
        self._n = 0  # rows in use; [0, n_sorted) are ordered by cell, [n_sorted, n) is the unsorted tail
        self._n_sorted = 0
        self._count = 0
        self.learned_on = 0  # live rows when the codebooks were learned
        self.added_since = 0  # rows added since then (new entries and edits alike)

    @property
    def n_keys(self) -> int:
        return 0 if self.c1 is None else len(self.c1)

    def __len__(self) -> int:
        return self._count

    def _cells_of(self, v: np.ndarray) -> np.ndarray:
        a = np.argmax(v[:, : self.h] @ self.c1.T, axis=1)
        b = np.argmax(v[:, self.h :] @ self.c2.T, axis=1)
        return a.astype(np.int64) * self.n_keys + b

    def _learn(self, vectors: np.ndarray) -> None:
        k = max(1, math.ceil(math.sqrt(len(vectors) / self.cell_size)))
        self.c1, self.c2 = _kmeans(vectors[:, : self.h], k), _kmeans(vectors[:, self.h :], k, seed=1)
        self.learned_on, self.added_since = len(vectors), 0

    def relearn(self) -> None:
        """Learn both codebooks again from the live entries and re-place every entry (see module docstring)."""
        self._sort()  # drops dead rows: [0, n) are live
        if self._n:
            self._learn(self._vecs[: self._n])
            self._cells[: self._n] = self._cells_of(self._vecs[: self._n])
            self._n_sorted = 0
            self._sort()

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.c1 is None:
            self._learn(vectors)
        n, m = self._n, len(ids)
        if n + m > len(self._ids):  # capacity doubling: one edit must not copy the whole shard
            cap = max(n + m, 2 * len(self._ids))
            for name in ("_ids", "_vecs", "_cells", "_alive"):
                old = getattr(self, name)
                new = np.zeros((cap, *old.shape[1:]), old.dtype)
                new[:n] = old[:n]
                setattr(self, name, new)
        self._ids[n : n + m], self._vecs[n : n + m] = ids, vectors
        self._cells[n : n + m], self._alive[n : n + m] = self._cells_of(vectors), True
        self._n += m
        self._count += m
        self.added_since += m
        if self.added_since > self.learned_on:
            self.relearn()
        elif self._n - self._n_sorted > _TAIL_MAX or self._n_sorted == 0:
            self._sort()

    def _sort(self) -> None:
        keep = np.nonzero(self._alive[: self._n])[0]
        order = keep[np.argsort(self._cells[keep], kind="stable")]
        self._ids, self._vecs, self._cells = self._ids[order], self._vecs[order], self._cells[order]
        self._alive = np.ones(len(order), bool)
        self._n = self._n_sorted = len(order)

    def remove(self, ids: np.ndarray) -> int:
        hit = np.isin(self._ids[: self._n], ids) & self._alive[: self._n]
        n = int(hit.sum())
        self._alive[: self._n][hit] = False
        self._count -= n
        return n

    def candidates(self, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
        """Rows in the best cells for one query, given its half scores s1, s2 (K,)."""
        kc = min(self.topk_half, self.n_keys)
        a = np.argpartition(-s1, kc - 1)[:kc]
        b = np.argpartition(-s2, kc - 1)[:kc]
        pair = (s1[a][:, None] + s2[b][None, :]).ravel()  # (kc*kc,) cartesian product of half scores
        best = np.argsort(-pair)[: self.n_cells]
        cells = (a[best // kc] * self.n_keys + b[best % kc]).astype(np.int64)
        sorted_cells = self._cells[: self._n_sorted]
        lo = np.searchsorted(sorted_cells, cells, "left")
        hi = np.searchsorted(sorted_cells, cells, "right")
        lens = hi - lo
        rows = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        tail = np.arange(self._n_sorted, self._n)
        if len(tail):
            rows = np.concatenate([rows, tail[np.isin(self._cells[tail], cells)]])
        return rows[self._alive[rows]]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s1 = queries[:, : self.h] @ self.c1.T  # (B, K)
        s2 = queries[:, self.h :] @ self.c2.T  # (B, K)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for i, q in enumerate(queries):
            rows = self.candidates(s1[i], s2[i])
            if not len(rows):
                continue
            sc = self._vecs[rows] @ q  # exact rescoring of the candidates
            top = np.argsort(-sc)[:k] if len(sc) <= k else np.argpartition(-sc, k - 1)[:k]
            top = top[np.argsort(-sc[top])]
            scores[i, : len(top)], ids[i, : len(top)] = sc[top], self._ids[rows[top]]
        return scores, ids

    def ids(self) -> np.ndarray:
        return self._ids[: self._n][self._alive[: self._n]].copy()

    def save(self, folder: Path) -> None:
        import torch
        from safetensors.torch import save_file

        self._sort()  # drops dead rows, so nothing removed is written to disk
        t = {"ids": self._ids, "vectors": self._vecs, "c1": self.c1, "c2": self.c2,
             "learned": np.array([self.learned_on, self.added_since], np.int64)}  # fmt: skip
        save_file(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}, folder / "pk.safetensors"
        )

    def load(self, folder: Path) -> ProductKeyShard:
        from safetensors.numpy import load_file

        t = load_file(folder / "pk.safetensors")
        if (
            t["vectors"].shape[1:] != (self.dim,)
            or t["c1"].shape[1] != self.h
            or len(t["ids"]) != len(t["vectors"])
        ):
            raise IndexFileError(f"{folder}: product-key tensors do not match dim {self.dim}")
        self.c1, self.c2 = t["c1"], t["c2"]
        self._ids, self._vecs = t["ids"], t["vectors"]
        self._cells = self._cells_of(self._vecs)
        self._alive = np.ones(len(self._ids), bool)
        self._n = self._count = len(self._ids)
        self._n_sorted = 0
        self._sort()
        # files written before codebooks were re-learned: treat them as learned on what they hold
        self.learned_on, self.added_since = t["learned"].tolist() if "learned" in t else (self._n, 0)
        return self


class ProductKeyIndex(ShardedIndex):
    """Product keys per namespace. ``topk_half``: centroids kept per half; ``n_cells``: cells rescored;
    ``cell_size``: mean entries per cell, so K = ceil(sqrt(N / cell_size)) keys per half (1 = ExplicitLM's sqrt(N))."""

    kind = "pk"

    def __init__(self, *, dim: int, topk_half: int = 32, n_cells: int = 256, cell_size: int = 16) -> None:
        super().__init__(dim=dim)
        self.topk_half, self.n_cells, self.cell_size = topk_half, n_cells, cell_size

    @property
    def params(self) -> dict:
        return {"topk_half": self.topk_half, "n_cells": self.n_cells, "cell_size": self.cell_size}

    def set_search_params(self, *, topk_half: int | None = None, n_cells: int | None = None) -> None:
        """Change how many cells are rescored, without rebuilding."""
        self.topk_half, self.n_cells = topk_half or self.topk_half, n_cells or self.n_cells
        for s in self.shards.values():
            s.topk_half, s.n_cells = self.topk_half, self.n_cells

    def _new_shard(self) -> ProductKeyShard:
        return ProductKeyShard(
            self.dim, topk_half=self.topk_half, n_cells=self.n_cells, cell_size=self.cell_size
        )

    def _load_shard(self, folder: Path) -> ProductKeyShard:
        return self._new_shard().load(folder)
