"""The backbone (GPT), its config, KV cache, checkpoints, and the memory-design registry."""

from memlm.model.cache import KVCache
from memlm.model.config import ModelConfig
from memlm.model.gpt import GPT, ModelOutput

__all__ = ["GPT", "KVCache", "ModelConfig", "ModelOutput"]
