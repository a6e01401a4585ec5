"""Exact inner-product search with torch: the reference every approximate index is tested against.

Vectors live in a capacity-doubling buffer; removal marks a row dead (masked to -inf) and the buffer is
compacted when half of it is dead, so an edit costs O(N) bytes scanned, never a full copy per edit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from memlm.index.base import IndexFileError, ShardedIndex


class ExactShard:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._vecs = torch.zeros(0, dim)
        self._ids = torch.zeros(0, dtype=torch.int64)
        self._live = torch.zeros(0, dtype=torch.bool)
        self._n = 0  # rows used in the buffers
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        n = len(ids)
        if self._n + n > len(self._vecs):
            cap = max(self._n + n, 2 * len(self._vecs), 1024)
            for name in ("_vecs", "_ids", "_live"):
                old = getattr(self, name)
                new = torch.zeros((cap, *old.shape[1:]), dtype=old.dtype)
                new[: self._n] = old[: self._n]
                setattr(self, name, new)
        self._vecs[self._n : self._n + n] = torch.from_numpy(vectors)
        self._ids[self._n : self._n + n] = torch.from_numpy(ids)
        self._live[self._n : self._n + n] = True
        self._n += n
        self._count += n

    def remove(self, ids: np.ndarray) -> int:
        hit = torch.isin(self._ids[: self._n], torch.from_numpy(ids)) & self._live[: self._n]
        removed = int(hit.sum())
        if removed:
            self._live[: self._n][hit] = False
            self._count -= removed
            if self._count < self._n // 2:
                self._compact()
        return removed

    def _compact(self) -> None:
        keep = self._live[: self._n]
        self._vecs, self._ids = self._vecs[: self._n][keep].clone(), self._ids[: self._n][keep].clone()
        self._n = self._count
        self._live = torch.ones(self._n, dtype=torch.bool)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = torch.from_numpy(queries) @ self._vecs[: self._n].T  # (B, n)
        scores.masked_fill_(~self._live[: self._n], float("-inf"))
        kk = min(k, self._n)
        top, pos = scores.topk(kk, dim=1)  # (B, kk)
        ids = self._ids[pos].masked_fill(torch.isinf(top), -1)
        return top.numpy(), ids.numpy()

    def ids(self) -> np.ndarray:
        return self._ids[: self._n][self._live[: self._n]].numpy().copy()

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        live = self._live[: self._n]
        return self._ids[: self._n][live].numpy(), self._vecs[: self._n][live].numpy()

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        ids, vecs = self.vectors()
        save_file(
            {"ids": torch.from_numpy(ids.copy()), "vectors": torch.from_numpy(vecs.copy())},
            folder / "exact.safetensors",
        )

    @classmethod
    def load(cls, folder: Path, dim: int) -> ExactShard:
        from safetensors.torch import load_file

        t = load_file(folder / "exact.safetensors")
        ids, vecs = t["ids"], t["vectors"]
        if vecs.ndim != 2 or vecs.shape[1] != dim or len(ids) != len(vecs):
            raise IndexFileError(
                f"{folder}: vectors of shape {tuple(vecs.shape)} for {len(ids)} ids, expected dim {dim}"
            )
        shard = cls(dim)
        shard.add(ids.numpy(), vecs.float().numpy())
        return shard


class ExactIndex(ShardedIndex):
    """Brute-force top-k, per namespace. Slow for 1M (O(N·d) per query) but always right."""

    kind = "exact"

    def _new_shard(self) -> ExactShard:
        return ExactShard(self.dim)

    def _load_shard(self, folder: Path) -> ExactShard:
        return ExactShard.load(folder, self.dim)
