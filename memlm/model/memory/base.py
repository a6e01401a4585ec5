"""The contract between the backbone and a memory design.

A design gives each block up to three hooks (all optional, chosen per layer):

- ``kv``: extra keys/values prepended to the block's self-attention (Memory³'s sparse memory KV).
- ``ffn_branch``: a module reading memory beside the FFN, added to it or replacing it (PlugLM, ExplicitLM).
- ``cross``: a cross-attention block between attention and FFN (ExplicitLM-style fusion, RAG-free reading).

What the design retrieved for one forward call travels in a :class:`MemoryContext`, so the same model
serves training, scoring and step-by-step generation. Hooks must respect causality: what they give
position ``t`` may depend only on tokens ``<= t`` (tests perturb later tokens to check).

A design that reads a bank also supplies a reader (:mod:`memlm.model.memory.reader`): the one object the
trainer, the evaluator and the generator call to turn bank entries into what the hooks consume.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from memlm.errors import ConfigError

if TYPE_CHECKING:
    from memlm.bank.store import MemoryBank
    from memlm.model.config import ModelConfig
    from memlm.model.memory.reader import MemoryReader


@dataclass
class LayerHooks:
    kv: nn.Module | None = (
        None  # kv(memory: MemoryContext) -> (k, v, mask | None); k, v: (B, n_kv_head, M, hd)
    )
    ffn_branch: nn.Module | None = None  # ffn_branch(h: (B, T, C), memory) -> (B, T, C)
    replace_ffn: bool = False  # True: the branch replaces the FFN; False: it is added to it
    cross: nn.Module | None = None  # cross(h: (B, T, C), memory) -> (B, T, C), added to the residual

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.kv, self.ffn_branch, self.cross) if m is not None]


@dataclass
class MemoryContext:
    """Per-call memory state: the design's inputs in, retrieval records and auxiliary losses out."""

    inputs: Any = None  # design-specific: retrieved entries, their token ids, precomputed KV, ...
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    retrieved_ids: Tensor | None = None  # (B, T, k) or (B, k) bank entry ids, -1 for none
    retrieved_scores: Tensor | None = None

    def add_loss(self, name: str, value: Tensor) -> None:
        self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value


@dataclass
class NoOptions:
    """A design without settings: any key in ``memory_options`` is a config error."""


class MemoryDesign:
    """Base class: a design registers under a key and builds each block's hooks from the config.

    ``options_class``: the typed dataclass that ``ModelConfig.memory_options`` is parsed into (unknown keys
    and wrong types are config errors naming the key). ``uses_bank``: the design reads a memory bank, so a
    model of this design cannot run without one.
    """

    name = "none"
    options_class: type = NoOptions
    uses_bank = False

    def shared_module(self, config: ModelConfig) -> nn.Module | None:
        """A module used by every memory layer (built once, before :meth:`layer_hooks`), or None."""
        return None

    def layer_hooks(self, config: ModelConfig, layer_idx: int) -> LayerHooks:
        return LayerHooks()

    def bind(self, model: nn.Module) -> None:
        """Called once the model is built: the shared module may keep plain references to backbone parts
        (PlugLM's knowledge encoder reads the token embedding) without registering them twice."""

    def options(self, config: ModelConfig) -> Any:
        return parse_options(self.options_class, config.memory_options, design=self.name)

    def reader(self, model: nn.Module, tokenizer, bank: MemoryBank | None = None) -> MemoryReader:
        """The object that feeds this design from ``bank``; the base reader lays out plain documents."""
        from memlm.model.memory.reader import MemoryReader

        return MemoryReader(model, tokenizer, bank)


def parse_options(cls: type, raw: dict[str, Any] | None, *, design: str) -> Any:
    """``memory_options`` (a plain dict from YAML or config.json) -> an instance of the dataclass ``cls``."""
    from memlm.config import from_dict

    try:
        return from_dict(cls, dict(raw or {}), prefix="model.memory_options.")
    except ConfigError as err:
        raise ConfigError(f"{err} (memory design {design!r})") from None


def options_dict(options: Any) -> dict[str, Any]:
    """The dataclass back to plain values (what config.json stores)."""
    hints = typing.get_type_hints(type(options))
    return {f.name: _plain(getattr(options, f.name), hints[f.name]) for f in dataclasses.fields(options)}


def _plain(value: Any, _tp: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value
