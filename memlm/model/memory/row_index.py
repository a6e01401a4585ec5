"""Vectors by table row and their top-n search: exact torch for small tables, memlm's FAISS index for big ones.

PlugLM's key table and the question's search of PlugLM and ExplicitLM (``query_encoder``) search vectors that
are labelled by a table row, not a bank id. Exact torch is one (Q, N) product: faster than a FAISS flat index
on a CPU (0.6 s against 2.3 s for 500 queries over 120,000 x 128-d keys on one core) but linear in N. From
``FAISS_FROM`` rows on, ``auto`` moves to :class:`memlm.index.FaissIndex` with spec auto, which is IVF from
50,000 vectors: ~sqrt(N) vectors scanned per query (docs/results_explicitlm.md: 0.75 ms against 31 ms per query
at 1M x 384-d, the same top-1 for queries near an entry).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memlm.errors import ConfigError

FAISS_FROM = 50_000  # index auto: exact torch below this many rows, FAISS from here on
INDEXES = ("auto", "exact", "faiss")


class RowIndex:
    """Vectors by table row and their top-n inner-product search.

    ``index``: ``exact``, one (Q, N) product in torch; ``faiss``, memlm's :class:`~memlm.index.FaissIndex` with
    spec auto (Flat below 50,000 vectors: the same top-n as exact, test; IVF from there on: ~4 sqrt(N) lists, 32
    probed, so ~8 sqrt(N) vectors scanned per query); ``auto``, exact until FAISS_FROM rows are live,
    faiss from then on. Rows never set, or removed, are never found. ``vectors`` stays row for row with the
    table (zeros where none), for designs that score the rows read with it.
    """

    def __init__(self, dim: int, *, index: str = "auto", device: torch.device | str = "cpu") -> None:
        if index not in INDEXES:
            raise ConfigError(f"index must be one of {', '.join(INDEXES)}, got {index!r}")
        self.index = index
        self.vectors = torch.zeros(0, dim, device=device)
        self.live = torch.zeros(0, dtype=torch.bool, device=device)
        self._faiss = None  # a FaissIndex labelled by row, once index (or size) asks for one

    def __len__(self) -> int:
        return int(self.live.sum())

    @property
    def uses_faiss(self) -> bool:
        return self._faiss is not None

    def to(self, device: torch.device | str) -> RowIndex:
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
        elif self.index == "faiss" or (self.index == "auto" and len(self) >= FAISS_FROM):
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
        k, parts = min(n, len(self.vectors)), []
        for chunk in queries.float().split(4096):  # bounds the (chunk, N) score matrix
            sims = (chunk @ self.vectors.T).masked_fill(~self.live, float("-inf"))
            parts.append(sims.topk(k, dim=-1))
        top = torch.cat([p.values for p in parts]) if parts else queries.new_zeros(0, k)
        rows = torch.cat([p.indices for p in parts]) if parts else torch.zeros(0, k, dtype=torch.long)
        rows = rows.to(queries.device).masked_fill(~torch.isfinite(top), -1)
        if top.shape[1] < n:  # fewer rows than n: pad
            pad = n - top.shape[1]
            top, rows = F.pad(top, (0, pad), value=float("-inf")), F.pad(rows, (0, pad), value=-1)
        return top, rows
