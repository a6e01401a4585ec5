"""Batch order as a pure function of (seed, step): the reason resume is exact.

Sequences are consumed as one endless stream: epoch ``e`` is a permutation of the dataset seeded by
``(seed, e)``, and stream position ``p`` is ``perm_{p // n}[p % n]``. Optimizer step ``s`` takes positions
``[s*G, (s+1)*G)`` with ``G = batch_size * grad_accum * world_size``; micro-step ``a`` of rank ``r`` takes
the ``B`` positions starting at ``s*G + (a*world_size + r)*B``. So a step's global batch is the same set of
sequences whatever the world size, and a run resumed at step ``s`` continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Yields the index lists of micro-batches ``(step, micro) for step in [start_step, end_step)``."""

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        batch_size: int,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        end_step: int,
    ) -> None:
        self.n, self.seed, self.batch_size, self.grad_accum = n, seed, batch_size, grad_accum
        self.rank, self.world_size, self.start_step, self.end_step = rank, world_size, start_step, end_step
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            for micro in range(self.grad_accum):
                start = step * self.global_batch + (micro * self.world_size + self.rank) * self.batch_size
                yield [self.index(p) for p in range(start, start + self.batch_size)]

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: self.permutation(epoch)}  # keep one epoch's permutation in memory
        return int(self._perms[epoch][offset])

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)
