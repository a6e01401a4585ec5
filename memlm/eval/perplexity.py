"""Perplexity of held-out documents, read the way the model was trained to read (its reader, no augmentation).

For a memory model this is the perplexity *with* its memory: on biographies of people the model never saw, a
model that reads the bank should find them far less surprising than the dense baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from memlm.data.pack import IGNORE_INDEX


@torch.no_grad()
def perplexity(model, reader, texts: Sequence[str], *, batch_size: int = 32) -> dict:
    """``{"ppl", "loss", "tokens", "docs"}``: token-weighted mean loss over the targets of ``texts``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        batch = reader.train_batch(list(texts[i : i + batch_size]), train=False).to(model.device)
        kw = {"memory": batch.memory} if batch.memory is not None else {}
        logits = model(batch.input_ids, **kw).logits  # no targets: the design's auxiliary losses stay out
        total += float(
            F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="sum")
        )
        count += int((batch.targets != IGNORE_INDEX).sum())
    model.train(was_training)
    mean = total / max(count, 1)
    return {"ppl": math.exp(mean), "loss": mean, "tokens": count, "docs": len(texts)}
