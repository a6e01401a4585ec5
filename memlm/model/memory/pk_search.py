"""Per-token product-key search over a table of learned keys, batched in torch (ExplicitLM's coarse stage).

The keys are the entries' own keys (made by the model's entry encoder from the entries' content). Each half of
the key space has K sub-keys: the centroids of spherical k-means on the entries' key halves. An entry sits in
the cell (a, b) of its nearest half-1 and half-2 sub-keys (or, when that cell already holds ``cell_cap`` rows,
the next-best cell with room), so where it sits is a function of its content: an edit that changes its key
re-places it (the public code's keys ignore content, so edits never move routing).

Search for a query q: the ``topk_half`` best sub-keys of each half, the ``n_cells`` best non-empty pairs of
their cartesian product (by the sum of half scores), the rows of those cells, rescored exactly with the
cached keys. Per query that costs 2·K·(d/2) for the half scores plus n_cells·cell_cap·d for the
rescoring, with K = ceil(sqrt(N / cell_size)): O(sqrt(N)), against O(N) for comparing with every key. All
queries of a batch (every token of every row) go through the same tensor ops, with no Python loop over them.

:mod:`memlm.index.product_keys` is the text-retrieval index (numpy, one query at a time, saved to disk); this
one searches every token position of a batch at once, on the model's device, and is rebuilt from the keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ProductKeySearch:
    """Rows with unit keys (R, d), ``alive`` marking those that may be found. Keyword-only settings:

    ``cell_size``: mean rows per cell (K = ceil(sqrt(N / cell_size)) sub-keys per half; 1 = ExplicitLM's sqrt(N));
    ``topk_half``: sub-keys kept per half; ``n_cells``: cells searched; ``cell_cap``: rows a cell holds (a row
    whose best cell is full goes to its next-best cell with room; :attr:`unreachable` counts the rows that
    found none).
    """

    def __init__(
        self, dim: int, *, cell_size: int = 16, topk_half: int = 8, n_cells: int = 8, cell_cap: int = 32
    ) -> None:
        if dim % 2:
            raise ValueError(f"product keys split the key in halves: dim={dim} must be even")
        self.dim, self.h = dim, dim // 2
        self.cell_size, self.topk_half, self.n_cells, self.cell_cap = cell_size, topk_half, n_cells, cell_cap
        self.keys = torch.zeros(0, dim)
        self.alive = torch.zeros(0, dtype=torch.bool)
        self.c1 = self.c2 = torch.zeros(0, self.h)  # (K, d/2) unit sub-keys of each half
        self.cell = torch.zeros(0, dtype=torch.long)  # (R,) cell of each row, -1 for dead rows
        self.order = torch.zeros(0, dtype=torch.long)  # alive rows sorted by cell
        self.start = torch.zeros(0, dtype=torch.long)  # (K*K,) first position of each cell in ``order``
        self.count = torch.zeros(0, dtype=torch.long)  # (K*K,) rows per cell
        self.cap = 0  # rows read per cell: min(largest cell, cell_cap)

    # ---- building --------------------------------------------------------------------------------
    @property
    def n_keys(self) -> int:
        return len(self.c1)

    @property
    def n_alive(self) -> int:
        return int(self.alive.sum())

    @property
    def unreachable(self) -> int:
        """Alive rows that no query can find, because their cell holds more than ``cell_cap`` rows."""
        return int((self.count - self.cap).clamp(min=0).sum()) if len(self.count) else 0

    def fit(self, keys: Tensor, alive: Tensor, *, seed: int = 0) -> None:
        """New keys for every row: the sub-keys are refit (k-means on the alive rows' halves), every row re-placed."""
        from memlm.index.product_keys import _kmeans

        self.keys, self.alive = keys.detach().float(), alive.clone()
        live = self.keys[self.alive].cpu().numpy()
        k = max(1, math.ceil(math.sqrt(max(len(live), 1) / self.cell_size)))
        device = self.keys.device
        self.c1 = torch.from_numpy(_kmeans(live[:, : self.h], k, seed=seed)).to(device)
        self.c2 = torch.from_numpy(_kmeans(live[:, self.h :], k, seed=seed + 1)).to(device)
        self.c1, self.c2 = _unit(self.c1), _unit(self.c2)
        self._place()

    def update(self, rows: Tensor, keys: Tensor, alive: Tensor) -> None:
        """Some rows changed (an edit, an add, a delete): set their keys and re-place every row with the
        current sub-keys. Rows past the end extend the table."""
        end = int(rows.max()) + 1 if len(rows) else 0
        if end > len(self.keys):
            grow = end - len(self.keys)
            self.keys = torch.cat([self.keys, self.keys.new_zeros(grow, self.dim)])
            self.alive = torch.cat([self.alive, self.alive.new_zeros(grow)])
            self.cell = torch.cat([self.cell, self.cell.new_full((grow,), -1)])
        self.keys[rows], self.alive[rows] = (
            keys.detach().float().to(self.keys.device),
            alive.to(self.keys.device),
        )
        if self.n_keys == 0:
            self.fit(self.keys, self.alive)
        else:
            self._place(rows)

    def _place(self, rows: Tensor | None = None) -> None:
        """Cells of ``rows`` (default: all) from their keys; then the cell-sorted layout.

        A row goes to the best cell of its key that still has room (``cell_cap``): keys that crowd one cell
        (entries about the same kind of thing) spill into their next-best cells, ranked by the same sum of
        half scores a query ranks cells by, so a nearby query still finds them. Without this a crowded cell
        hides every row past its cap (on the bios bank early in training: over half of the entries).
        """
        K = self.n_keys
        if rows is None:
            rows = torch.arange(len(self.keys), device=self.keys.device)
            self.cell = torch.full((len(self.keys),), -1, dtype=torch.long, device=self.keys.device)
        self.cell[rows] = -1
        self.cell = self.cell.masked_fill(~self.alive, -1)
        rows = rows[self.alive[rows]]
        if len(rows):
            taken = torch.bincount(self.cell[self.cell >= 0], minlength=K * K)
            self.cell[rows] = self._assign(self.keys[rows], (self.cell_cap - taken).clamp(min=0))
        live = torch.nonzero(self.alive).flatten()
        self.order = live[torch.argsort(self.cell[live], stable=True)]
        self.count = torch.bincount(self.cell[live], minlength=K * K)
        self.start = torch.cumsum(self.count, 0) - self.count
        self.cap = min(int(self.count.max()) if len(live) else 0, self.cell_cap)

    def _assign(self, keys: Tensor, free: Tensor) -> Tensor:
        """(n, d) keys, (K*K,) free places per cell -> (n,) cells: each row's best cell with room.

        Rounds over preference ranks (at most topk_half² of them), each vectorised over every row still
        unplaced; within a cell the best-scoring rows get in first. A row whose preferred cells are all full
        stays in its best cell (:attr:`unreachable` counts it)."""
        score, pref = self._ranked_cells(keys)  # (n, P) each, best first
        cell = torch.full((len(keys),), -1, dtype=torch.long, device=keys.device)
        free = free.clone()
        for r in range(pref.shape[1]):
            todo = torch.nonzero(cell < 0).flatten()
            if not len(todo):
                break
            by_score = torch.argsort(score[todo, r], descending=True)
            o = by_score[torch.argsort(pref[todo, r][by_score], stable=True)]  # grouped by cell, best first
            want = pref[todo[o], r]
            rank = torch.arange(len(o), device=keys.device) - torch.searchsorted(
                want, want
            )  # rank in its cell
            ok = rank < free[want]
            cell[todo[o[ok]]] = want[ok]
            free -= torch.bincount(want[ok], minlength=len(free))
        left = cell < 0
        cell[left] = pref[left, 0]
        return cell

    def _ranked_cells(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """(n, d) -> (scores, cells), each (n, kc²) with kc = min(topk_half, K): the cells of the cartesian
        product of each half's ``topk_half`` best sub-keys, best (sum of the half scores) first."""
        K = self.n_keys
        s1, s2 = self.half_scores(q)
        kc = min(self.topk_half, K)
        v1, i1 = s1.topk(kc, dim=1)  # (n, kc)
        v2, i2 = s2.topk(kc, dim=1)
        pair = (v1[:, :, None] + v2[:, None, :]).flatten(1)  # (n, kc*kc): the cartesian product
        cells = (i1[:, :, None] * K + i2[:, None, :]).flatten(1)  # (n, kc*kc)
        pair, order = pair.sort(dim=1, descending=True)
        return pair, cells.gather(1, order)

    def cells_of(self, keys: Tensor) -> Tensor:
        """(n, d) keys -> (n,) cell index a * K + b."""
        a = (keys[:, : self.h] @ self.c1.T).argmax(1)
        b = (keys[:, self.h :] @ self.c2.T).argmax(1)
        return a * self.n_keys + b

    def to(self, device: torch.device | str) -> ProductKeySearch:
        for name in ("keys", "alive", "c1", "c2", "cell", "order", "start", "count"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # ---- search ----------------------------------------------------------------------------------
    def half_scores(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """(n, d) queries -> their scores with each half's sub-keys, (n, K) twice (differentiable in q)."""
        return q[:, : self.h] @ self.c1.T, q[:, self.h :] @ self.c2.T

    @torch.no_grad()
    def candidates(self, q: Tensor) -> Tensor:
        """(n, d) queries -> (n, M) candidate rows, -1 padded; M = min(n_cells, topk_half²) * cap."""
        n = q.shape[0]
        if self.cap == 0:
            return torch.full((n, 0), -1, dtype=torch.long, device=q.device)
        pair, cells = self._ranked_cells(q)  # (n, kc*kc)
        pair = pair.masked_fill(self.count[cells] == 0, float("-inf"))  # an empty cell is no candidate
        best = pair.topk(min(self.n_cells, pair.shape[1]), dim=1).indices  # (n, nc)
        cells = cells.gather(1, best)  # (n, nc)
        offset = torch.arange(self.cap, device=q.device)
        slot = self.start[cells][..., None] + offset  # (n, nc, cap) positions in ``order``
        rows = self.order[slot.clamp(max=len(self.order) - 1)]
        return rows.masked_fill(offset >= self.count[cells][..., None], -1).flatten(1)

    @torch.no_grad()
    def search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(n, d) queries -> (scores (n, k), rows (n, k)) by the cached keys, best first; -1 / -inf pad."""
        rows = self.candidates(q)
        uniq, inv = rows.clamp(min=0).unique(return_inverse=True)
        if len(uniq) * 4 <= rows.shape[1] * q.shape[1]:
            # Fewer scores (n, U) than the floats of every query's own copy of its candidates' keys (n, M, d):
            # score the distinct candidates once. A prompt's positions share most of them, and the copy was
            # most of a prompt's search (n positions x 512 candidates x d).
            scores = (q.float() @ self.keys[uniq].T).gather(1, inv)
        else:
            scores = torch.einsum("nd,nmd->nm", q.float(), self.keys[rows.clamp(min=0)])
        return _top(scores.masked_fill(rows < 0, float("-inf")), rows, k)

    @torch.no_grad()
    def exact(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The reference: every query against every alive key, O(N) per query."""
        scores = (q.float() @ self.keys.T).masked_fill(~self.alive, float("-inf"))
        rows = torch.arange(len(self.keys), device=q.device).expand(len(q), -1)
        return _top(scores, rows, k)


def _top(scores: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    k = min(k, scores.shape[1])
    top, pos = scores.topk(k, dim=1)
    return top, rows.gather(1, pos).masked_fill(torch.isinf(top), -1)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
