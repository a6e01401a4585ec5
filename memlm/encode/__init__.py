"""Text encoders for the memory bank: pretrained MiniLM (offline), hashing, or any callable (the LM's layers).

``load_encoder(spec)``: "hashing" | "hashing:DIM" | "minilm".
"""

from __future__ import annotations

from memlm.encode.base import CallableEncoder, Encoder, l2_normalise
from memlm.encode.hashing import HashingEncoder
from memlm.errors import ConfigError


def load_encoder(spec: str) -> Encoder:
    """Build an encoder from its spec string (stored in a bank as its default)."""
    name, _, arg = spec.partition(":")
    if name == "hashing":
        try:
            return HashingEncoder(dim=int(arg) if arg else 384)
        except ValueError:
            raise ConfigError(f"encoder {spec!r}: expected hashing:DIM with an integer DIM") from None
    if name == "minilm":
        from memlm.encode.minilm import MiniLMEncoder

        return MiniLMEncoder()
    raise ConfigError(f"unknown encoder {spec!r} (known: hashing, hashing:DIM, minilm)")


__all__ = ["CallableEncoder", "Encoder", "HashingEncoder", "l2_normalise", "load_encoder"]
