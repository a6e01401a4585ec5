"""memlm: language models with explicit, editable memory.

Heavy modules (torch, faiss, sentence-transformers) are imported where they are used, so
``import memlm`` and ``memlm --help`` stay fast.
"""

__version__ = "0.1.0"

from memlm.errors import CheckpointError, InputError, MemlmError  # noqa: E402

__all__ = ["CheckpointError", "InputError", "MemlmError", "__version__"]
