"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

A pure function of the step, so resuming needs no scheduler state beyond the step itself, and every
parameter group (backbone, memory) follows the same shape scaled by its own peak lr.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Warm-up reaches 1.0 at step ``warmup_steps - 1`` (step 0 already gets a non-zero lr); cosine then falls
    to ``min_ratio`` at ``max_steps`` and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, factor: float) -> None:
    """Scale every group's peak lr (``base_lr``, set by :func:`memlm.train.optim.build_optimizer`)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
