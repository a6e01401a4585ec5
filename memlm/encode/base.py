"""The encoder interface: texts -> float32 vectors, with a fingerprint that keys every cached vector.

Any text encoder fits (the pretrained MiniLM, the hashing encoder, or the language model's own layers
through :class:`CallableEncoder`, as Memory³ and PlugLM need). The fingerprint must change whenever the
vectors would (other weights, other checkpoint, other settings), so cached vectors are never reused wrongly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from memlm.errors import InputError


@runtime_checkable
class Encoder(Protocol):
    """``encode(texts) -> (N, dim) float32``; ``fingerprint`` identifies the function it computes."""

    dim: int
    fingerprint: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows to unit length (zero rows stay zero), so inner product = cosine in every index."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class CallableEncoder:
    """Adapter: any ``fn(list[str]) -> array or torch tensor (N, dim)`` becomes an :class:`Encoder`.

    ``fingerprint`` is the caller's promise, e.g. ``f"gpt:{checkpoint_sha}:layer4-mean"``.
    Batches of ``batch_size`` texts; runs under ``torch.no_grad`` when torch is present.
    """

    def __init__(
        self,
        fn: Callable[[list[str]], object],
        *,
        dim: int,
        fingerprint: str,
        normalise: bool = True,
        batch_size: int = 256,
    ) -> None:
        if not fingerprint:
            raise InputError("an encoder needs a non-empty fingerprint", field="fingerprint")
        self.fn, self.dim, self.fingerprint = fn, int(dim), fingerprint
        self.normalise, self.batch_size = normalise, batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                v = self.fn(list(texts[i : i + self.batch_size]))
                if isinstance(v, torch.Tensor):
                    v = v.detach().float().cpu().numpy()
                v = np.asarray(v, dtype=np.float32)
                if v.ndim != 2 or v.shape[1] != self.dim:
                    raise InputError(
                        f"encoder {self.fingerprint!r} returned shape {v.shape}, expected (N, {self.dim})"
                    )
                out.append(v)
        v = np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
        return l2_normalise(v) if self.normalise else v
