"""Byte-level BPE tokenizer (HF ``tokenizers``) with the special tokens every memory design needs.

Byte-level means any unicode string round-trips exactly. BOS, EOS and PAD are distinct ids, and the
memory designs' tokens are reserved up front so that a tokenizer trained once serves every design:
LMLM's lookup grammar ``<|db_entity|> E<|db_relationship|> R<|db_return|> V<|db_end|>`` (seed 003)
and a memory-reference token.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from memlm.errors import CheckpointError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
DB_ENTITY, DB_RELATIONSHIP, DB_RETURN, DB_END = (
    "<|db_entity|>",
    "<|db_relationship|>",
    "<|db_return|>",
    "<|db_end|>",
)
MEM = "<|mem|>"
# Order fixes the ids 0..7, so every memlm tokenizer agrees on them.
SPECIAL_TOKENS = (PAD, BOS, EOS, DB_ENTITY, DB_RELATIONSHIP, DB_RETURN, DB_END, MEM)

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer``; ``encode``/``decode`` work on plain lists of ints."""

    def __init__(self, backend) -> None:
        self.backend = backend
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise CheckpointError(f"tokenizer lacks memlm's special tokens {missing}")
        self.pad_id, self.bos_id, self.eos_id = (backend.token_to_id(t) for t in (PAD, BOS, EOS))
        self.special_ids = frozenset(backend.token_to_id(t) for t in SPECIAL_TOKENS)

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
        """Train byte-level BPE on an iterable of strings (streamed; the corpus need not fit in memory)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    # ---- use ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise KeyError(f"unknown token {token!r}")
        return tid

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        head, tail = ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])
        return [head + e.ids + tail for e in encs]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        """Hash of the serialized tokenizer: artifacts built with token ids are tied to it."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.exists():
            raise CheckpointError(f"{path}: tokenizer file not found")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{path}: not a valid tokenizer file ({err})") from err
        return cls(backend)
