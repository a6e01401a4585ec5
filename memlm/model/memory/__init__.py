"""Memory designs plug into the backbone through per-layer hooks; each design lives in its own file."""

from memlm.model.memory.base import LayerHooks, MemoryContext, MemoryDesign
from memlm.model.memory.registry import get_memory_design, list_memory_designs, register_memory_design

__all__ = [
    "LayerHooks",
    "MemoryContext",
    "MemoryDesign",
    "get_memory_design",
    "list_memory_designs",
    "register_memory_design",
]
