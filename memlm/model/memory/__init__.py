"""Memory designs plug into the backbone through per-layer hooks; each design lives in its own file.

Importing this package registers every shipped design (``rag``, ``explicitlm``, ``memory3``, ...), so ``ModelConfig.memory``
can name it.
"""

from memlm.model.memory import (
    explicitlm,  # noqa: E402, F401  (registers "explicitlm")
    lmlm,  # noqa: E402, F401  (registers "lmlm")
    memory3,  # noqa: E402, F401  (registers "memory3")
    pluglm,  # noqa: E402, F401  (registers "pluglm")
    rag,  # noqa: E402, F401  (registers "rag")
)
from memlm.model.memory.base import LayerHooks, MemoryContext, MemoryDesign
from memlm.model.memory.reader import MemoryReader, PromptBatch, TrainBatch
from memlm.model.memory.registry import get_memory_design, list_memory_designs, register_memory_design

__all__ = [
    "LayerHooks",
    "MemoryContext",
    "MemoryDesign",
    "MemoryReader",
    "PromptBatch",
    "TrainBatch",
    "get_memory_design",
    "list_memory_designs",
    "register_memory_design",
]
