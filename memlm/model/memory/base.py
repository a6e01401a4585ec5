"""The contract between the backbone and a memory design.

A design gives each block up to three hooks (all optional, chosen per layer):

- ``kv``: extra keys/values prepended to the block's self-attention (Memory³'s sparse memory KV).
- ``ffn_branch``: a module reading memory beside the FFN, added to it or replacing it (PlugLM, ExplicitLM).
- ``cross``: a cross-attention block between attention and FFN (ExplicitLM-style fusion, RAG-free reading).

What the design retrieved for one forward call travels in a :class:`MemoryContext`, so the same model
serves training, scoring and step-by-step generation. Hooks must respect causality: what they give
position ``t`` may depend only on tokens ``<= t`` (tests perturb later tokens to check).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from memlm.model.config import ModelConfig


@dataclass
class LayerHooks:
    kv: nn.Module | None = (
        None  # kv(memory: MemoryContext) -> (k, v, mask | None); k, v: (B, n_kv_head, M, hd)
    )
    ffn_branch: nn.Module | None = None  # ffn_branch(h: (B, T, C), memory) -> (B, T, C)
    replace_ffn: bool = False  # True: the branch replaces the FFN; False: it is added to it
    cross: nn.Module | None = None  # cross(h: (B, T, C), memory) -> (B, T, C), added to the residual


@dataclass
class MemoryContext:
    """Per-call memory state: the design's inputs in, retrieval records and auxiliary losses out."""

    inputs: Any = None  # design-specific: retrieved entries, their token ids, precomputed KV, ...
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    retrieved_ids: Tensor | None = None  # (B, T, k) or (B, k) bank entry ids, -1 for none
    retrieved_scores: Tensor | None = None

    def add_loss(self, name: str, value: Tensor) -> None:
        self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value


class MemoryDesign:
    """Base class: a design registers under a key and builds each block's hooks from the config."""

    name = "none"

    def layer_hooks(self, config: ModelConfig, layer_idx: int) -> LayerHooks:
        return LayerHooks()
