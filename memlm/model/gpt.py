"""The decoder-only backbone every memory design stands on.

RoPE, RMSNorm, SwiGLU, causal attention through ``scaled_dot_product_attention`` (optionally grouped-query),
tied embeddings. Memory designs attach per block through :class:`~memlm.model.memory.LayerHooks`:
extra attention key/values, an FFN branch (added or replacing), or a cross-attention block. With no memory
design the model is a plain GPT, the ``dense`` baseline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.model.cache import KVCache
from memlm.model.config import ModelConfig
from memlm.model.memory import LayerHooks, MemoryContext, get_memory_design


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    loss: Tensor | None = None  # mean CE over targets != -100, plus the memory design's auxiliary losses
    retrieval: MemoryContext | None = None  # what the memory read: ids, scores, auxiliary losses
    cache: KVCache | None = None


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE, gathered by explicit positions (left padding shifts them)."""

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (L, hd/2)
        # Not persistent: derived from the config, so checkpoints stay small and never disagree with it.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (B, T) -> cos, sin of shape (B, 1, T, hd/2), broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, hd) rotated by position; computed in fp32 for accuracy, returned in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # One matmul for queries, keys and values: fewer, larger GEMMs run faster than three small ones.
        self.wqkv = nn.Linear(
            config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=False
        )
        self.wo = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        mask: Tensor | None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        prefix: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)  # (B, nh|nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, nkv, past + T, hd)
        is_causal = mask is None and T > 1 and k.shape[2] == T
        if prefix is not None:
            # Memory key/values go before the context's; every query may see them unless the design's mask
            # (B, T, M) says otherwise (that is how a design keeps memory causal per position).
            pk, pv, pmask = prefix
            S = k.shape[2]
            if mask is not None or pmask is not None or T > 1:  # one unmasked query sees everything: no mask
                if mask is None:
                    mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None, None]
                if pmask is None:
                    pmask = torch.ones(B, T, pk.shape[2], dtype=torch.bool, device=x.device)
                mask = torch.cat([pmask[:, None].expand(B, 1, T, -1), mask.expand(B, 1, T, S)], dim=-1)
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
            is_causal = False
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(config.n_embd, 2 * config.ffn_hidden, bias=False)  # one matmul for both
        self.w_down = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, hooks: LayerHooks) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config)
        self.cross_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps) if hooks.cross is not None else None
        self.cross = hooks.cross
        self.ffn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.ffn = None if hooks.replace_ffn else SwiGLU(config)
        self.memory = hooks.ffn_branch
        self.memory_kv = hooks.kv
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        memory: MemoryContext | None,
    ) -> Tensor:
        prefix = self.memory_kv(memory) if self.memory_kv is not None and memory is not None else None
        h = self.attn(
            self.attn_norm(x), cos, sin, mask=mask, cache=cache, layer_idx=self.layer_idx, prefix=prefix
        )
        x = x + self.drop(h)
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), memory)
        h = self.ffn_norm(x)
        out = self.ffn(h) if self.ffn is not None else torch.zeros_like(h)
        if self.memory is not None:
            out = out + self.memory(h, memory)
        return x + self.drop(out)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        design = get_memory_design(config.memory)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        # A design's model-wide part (an entry encoder shared by its layers), or None. Hooks must not
        # register it again as their own submodule: safetensors refuses tensors saved under two names.
        self.memory = design.shared_module(config)
        hooks = [design.layer_hooks(config, i) for i in range(config.n_layer)]
        self.blocks = nn.ModuleList(Block(config, i, h) for i, h in enumerate(hooks))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config.head_dim, config.block_size, config.rope_theta)

        # Memory modules (the hooks, the cross-attention norms, the shared part) initialise themselves — many
        # are zero-initialised so that an empty memory is a no-op — and train with their own lr (memory_lr).
        memory_roots = [m for h in hooks for m in h.modules()]
        memory_roots += [b.cross_norm for b in self.blocks if b.cross_norm is not None]
        memory_roots += [self.memory] if self.memory is not None else []
        self._memory_module_ids = {id(sub) for m in memory_roots for sub in m.modules()}
        for module in self.modules():
            if id(module) not in self._memory_module_ids:
                self._init_weights(module)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's variance
        # does not grow with depth.
        for block in self.blocks:
            for p in (block.attn.wo.weight, *([block.ffn.w_down.weight] if block.ffn is not None else [])):
                nn.init.normal_(p, mean=0.0, std=config.init_std / (2 * config.n_layer) ** 0.5)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        design.bind(self)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def memory_parameter_names(self) -> set[str]:
        """Qualified names of the memory design's parameters (hooks, cross norms, shared part)."""
        return {
            f"{prefix}.{name}" if prefix else name
            for prefix, module in self.named_modules()
            if id(module) in self._memory_module_ids
            for name, _ in module.named_parameters(recurse=False)
        }

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - self.wte.weight.numel() if exclude_embeddings else n

    def new_cache(
        self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None
    ) -> KVCache:
        c = self.config
        return KVCache(
            n_layer=c.n_layer,
            batch_size=batch_size,
            n_kv_head=c.n_kv_head,
            max_len=max_len or c.block_size,
            head_dim=c.head_dim,
            device=self.device,
            dtype=dtype or self.wte.weight.dtype,
        )

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        memory: MemoryContext | None = None,
    ) -> ModelOutput:
        """Run the model.

        input_ids: (B, T). targets: (B, T), already shifted (targets[:, t] is the token after position t),
        -100 where no loss is taken. attention_mask: (B, past + T) with 0 on left padding.
        position_ids: (B, T); default continues from the cache. cache: filled in place and advanced by T.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size={self.config.block_size}")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(position_ids)
        mask = self._attention_mask(T, past, attention_mask)

        x = self.drop(self.wte(input_ids))  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache, memory)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(self.norm(x))  # (B, T, V)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            # Mean over counted tokens; a batch with none counts as 0 (a plain mean would give NaN).
            loss = loss / (targets != -100).sum().clamp(min=1)
            if memory is not None and memory.aux_losses:
                loss = loss + sum(memory.aux_losses.values())
        return ModelOutput(logits=logits, loss=loss, retrieval=memory, cache=cache)

    def _attention_mask(self, T: int, past: int, attention_mask: Tensor | None) -> Tensor | None:
        """Boolean (B|1, 1, T, past+T) mask, or None when SDPA's own causal flag (or no mask) is exact."""
        if attention_mask is None and (past == 0 or T == 1):
            return None
        S = past + T
        device = self.device
        allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(past)[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            keys = attention_mask[:, None, None, :S].bool()
            # A padding query would see no key at all (NaN rows); let every query see itself.
            own = torch.zeros(T, S, dtype=torch.bool, device=device)
            own[torch.arange(T), past + torch.arange(T)] = True
            allowed = (allowed & keys) | own
        return allowed

    # ---- checkpoints: folders with safetensors weights (memlm/model/checkpoint.py) -------------
    def fingerprint(self) -> str:
        from memlm.model.checkpoint import weights_fingerprint

        return weights_fingerprint(self)

    def save_pretrained(
        self, directory: str | os.PathLike, *, tokenizer=None, memory: dict | None = None
    ) -> Path:
        from memlm.model.checkpoint import save_pretrained

        return save_pretrained(self, directory, tokenizer=tokenizer, memory=memory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> GPT:
        from memlm.model.checkpoint import load_model

        return load_model(directory, device=device)
