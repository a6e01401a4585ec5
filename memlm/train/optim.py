"""AdamW with parameter groups.

- No weight decay on 1-D parameters (norm gains, biases): decaying them only pulls scales toward zero.
- Memory parameters get their own groups and learning rate: memory tables often want a larger lr than the
  backbone (product-key memories, PlugLM). The model names them (``GPT.memory_parameter_names``: every
  parameter of a design's hooks, whichever hook); a model without that method has none.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, *, lr: float, memory_lr: float | None, weight_decay: float) -> list[dict]:
    """Up to four groups — backbone/memory x decay/no_decay — each with ``name``, ``lr`` and ``base_lr``.

    Empty groups are left out. Tied parameters appear once (``named_parameters`` de-duplicates them).
    """
    memory_names = model.memory_parameter_names() if hasattr(model, "memory_parameter_names") else set()
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((name in memory_names, p.ndim >= 2), []).append(p)
    groups = []
    for memory in (False, True):
        for decay in (True, False):
            params = buckets.get((memory, decay))
            if not params:
                continue
            group_lr = memory_lr if memory and memory_lr is not None else lr
            groups.append(
                {
                    "name": f"{'memory' if memory else 'backbone'}_{'decay' if decay else 'no_decay'}",
                    "params": params,
                    "lr": group_lr,
                    "base_lr": group_lr,
                    "weight_decay": weight_decay if decay else 0.0,
                }
            )
    return groups


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``cfg`` is a :class:`memlm.config.TrainConfig`."""
    groups = param_groups(model, lr=cfg.lr, memory_lr=cfg.memory_lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
