"""Model configuration: one typed dataclass that round-trips through ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from memlm.errors import CheckpointError, ConfigError

ARCH = "memlm-gpt"  # written into every checkpoint; a folder with another arch is refused on load


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    block_size: int = 256  # longest sequence (prompt + generation) the RoPE tables cover
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: = n_head (multi-head); fewer: grouped-query attention
    n_embd: int = 256
    ffn_hidden: int | None = None  # None: SwiGLU's 8/3 * n_embd (same FLOPs as a 4x GELU MLP), rounded up
    ffn_multiple_of: int = 32
    dropout: float = 0.0  # tiny models on small corpora may want 0.1; 0 keeps runs exactly reproducible
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = (
        True  # input embedding = output projection: fewer parameters, better at small scale
    )
    init_std: float = 0.02
    # Memory design, chosen by registry key (memlm.model.memory.registry), so config files round-trip.
    memory: str = "none"
    memory_layers: list[int] | None = None  # which blocks carry the design's hooks; None: the design decides
    memory_options: dict[str, Any] = field(default_factory=dict)  # design-specific settings
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "ffn_multiple_of"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.n_kv_head is not None and self.n_kv_head < 1:
            raise ConfigError(f"model.n_kv_head must be >= 1, got {self.n_kv_head}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.ffn_hidden is None:
            hidden = int(8 * self.n_embd / 3)
            m = self.ffn_multiple_of
            self.ffn_hidden = m * ((hidden + m - 1) // m)
        # The design must exist and its memory_options must parse (typed, unknown keys refused) at load time,
        # not later in the middle of a run.
        from memlm.model.memory.registry import get_memory_design

        get_memory_design(self.memory).options(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("head_dim")
        return {"arch": ARCH, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> ModelConfig:
        d = dict(d)
        arch = d.pop("arch", ARCH)
        if arch != ARCH:
            raise CheckpointError(f"{source}: architecture {arch!r} is not {ARCH!r}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(
                f"{source}: unknown model config fields {unknown} (written by another version?)"
            )
        return cls(**d)
