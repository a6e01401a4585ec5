"""Two-part keys (``key: parts``; PlugLM and ExplicitLM): an entry's subject and relation encoded apart, each
into one half of the key, and the query made the same way.

Why: with one pooled key per "subject relation" text, a person's six keys differ only by the one or two relation
tokens inside the pool, and PlugLM's learned query found the right person for 0.91 of bios questions but that
person's right relation for 0.63 of those. With halves, relation counts for half of every score, whatever the
lengths of name and relation; for ExplicitLM's product keys the halves are its two sub-key spaces. Measured at
the shared 2,000-step budget it is worse for both designs (docs/results_pluglm.md, docs/results_explicitlm.md),
so it is off by default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from memlm.model.memory.reader import as_in_a_sentence


def part_tokens(tokenizer, subject: str, relation: str, budget: int) -> tuple[list[int], int]:
    """Key token ids — the subject's, then the relation's, each cut to its half of ``budget`` (so every key that
    shares a subject or a relation has the same tokens for it) — and how many are the subject's."""
    head = tokenizer.encode(as_in_a_sentence(subject))[: budget // 2]
    tail = tokenizer.encode(as_in_a_sentence(relation.replace("_", " ")))[: budget - budget // 2]
    return head + tail, len(head)


def key_halves(key_dim: int) -> tuple[int, int]:
    """Widths of the subject and relation halves of a ``key_dim`` key."""
    return key_dim - key_dim // 2, key_dim // 2


def join_halves(subject: Tensor, relation: Tensor) -> Tensor:
    """Two unnormalised halves (..., d1), (..., d2) -> one unit vector whose inner product with another is the
    mean of the two halves' cosines."""
    return torch.cat([F.normalize(subject, dim=-1), F.normalize(relation, dim=-1)], -1) / math.sqrt(2)
