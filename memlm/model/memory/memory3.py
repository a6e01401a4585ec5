"""Memory³: explicit memories as sparse attention key-values (Yang et al. 2024, "Memory³: Language Modeling
with Explicit Memory", arXiv 2407.01178). No official code exists; this is the reference implementation.

Writing a memory: a bank entry (a reference of <= ``max_tokens`` tokens) runs through the model once; in each
memory layer and key-value head the ``keep`` tokens that receive the most attention (summed over every query,
without the causal mask) are kept. Keys are kept after RoPE at the reference's own positions, and every memory
starts at position 0 (parallel positions), so a memory does not depend on where it is read.

Reading: for the prompt and then every ``chunk`` tokens, ``k`` entries are retrieved (the bank's Retriever,
MiniLM, by what an entry is *about*: see ``rag.py``) with the text so far; in the memory layers their key-values
go before the context's (``LayerHooks.kv``). They never enter the KV cache, so a new retrieval replaces them
without touching the context.

Training, in two stages as the paper found memory from scratch gave no gain: ``warmup_steps`` steps of plain
documents without memory, then continual training with memory (one run; the stage is a function of the step,
so a run resumes across the switch). Each document is cut into chunks: the first reads the memories retrieved
with the document's first sentence (its *query*, which takes no loss, as RAG), chunk c >= 1 starts ``chunk``
tokens after the query and reads memories retrieved with all the text before it. ``max_overlap`` drops
references that share more than that share of their tokens with the document (paper: 90%).

What memlm does differently:
- Training encodes the retrieved references inside the forward pass with the current weights, so memories are
  always those the model would write now and (``encode_grad``) the writing is trained too. Every chunk's
  memories go into one forward: the memory axis holds all of them and a (B, T, M) mask lets each position see
  its own chunk's only — no Python loop over chunks; ``tests/test_memory3.py`` checks this equals chunk-by-chunk
  decoding with a KV cache.
- Stored memories are derived artifacts keyed by the entry's content hash and the checkpoint fingerprint
  (``memory3_store.py``): fp32, fp16, int8 with per-channel scales or FAISS product quantisation; new weights
  rebuild them, or with ``on_stale: error`` raise an error naming both checkpoints (the paper's Remark 9).
  A deleted entry's memory goes with it (the bank scrubs its row; the LRU of decoded memories is evicted).
- Retrieval never sees a token a training position is trained to predict (the paper does not say).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from memlm.errors import ConfigError
from memlm.model.memory.base import LayerHooks, MemoryContext, MemoryDesign
from memlm.model.memory.memory3_store import FORMATS, Encoded, MemoryStore
from memlm.model.memory.rag import RAGReader, _names, object_pools, object_swapper, query_text
from memlm.model.memory.reader import MemoryReader, PromptBatch, TrainBatch
from memlm.model.memory.registry import register_memory_design


@dataclass
class Memory3Options:
    k: int = 5  # memories retrieved per chunk (paper: 5)
    chunk: int = 64  # tokens between two retrievals, in training and generation (paper: 64)
    keep: int = 8  # tokens kept per memory layer and key-value head (paper: 8 of a 128-token reference)
    max_tokens: int = 128  # a reference is cut to this many tokens (paper: references of <= 128 tokens)
    encoder: str = "minilm"  # retriever's text encoder (memlm.encode spec)
    key: str = "about"  # what of an entry is searched: about (subject + relation) | text (see rag.py)
    index: str = "exact"  # exact | faiss | pk (memlm.index); exact is the reference
    index_params: dict[str, Any] = field(default_factory=dict)  # passed to the index class
    namespaces: list[str] | None = None  # retrieval scope; None: every namespace of the bank
    query_chars: int = 512  # a training document's first query is at most this long (its first sentence)
    swap_prob: float = (
        0.0  # training: share of read triples whose object is swapped in entry and text (rag.py)
    )
    max_overlap: float = 0.9  # training: a reference sharing more of its tokens with the document is not read
    # Training only, teacher-forced reading: of the top `train_pick` hits of a chunk's (causal) query, read the
    # k whose object the document names from that chunk on, best first (then the best others). 0: plain top k.
    train_pick: int = 0
    query_noise: float = 0.0  # training: share of the query's tokens the model sees replaced by random ones
    # Training: rows added to each batch that spell one of the batch's read references while reading its own
    # memory. Every token after the first can only come from the memory, so the model learns to copy a
    # multi-token value from memory key-values (without them, runs that never learn it answer the first token
    # of a date or employer from memory and the rest from the weights). 0: none.
    copy_rows: int = 0
    warmup_steps: int = 0  # training stage 1: steps without memory before continual training with it
    encode_grad: bool = True  # training: the loss trains how the model writes memories, not only how it reads
    storage: str = "fp16"  # stored memories: fp32 | fp16 | int8 (per-channel scale) | pq (FAISS PQ)
    pq_m: int = 8  # pq: one-byte codes per head vector (must divide the head dim)
    cache_size: int = 4096  # decoded memories kept for generation (LRU)
    on_stale: str = "rebuild"  # memories built by other weights: rebuild them | error
    precompute: bool = (
        True  # encode every entry at a checkpoint's first read (paper); False: at its first use
    )

    def __post_init__(self) -> None:
        from memlm.bank.vectors import KEYS
        from memlm.index import KINDS

        p = "model.memory_options."
        for name in ("k", "chunk", "keep", "max_tokens", "query_chars", "pq_m", "cache_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name} must be >= 1, got {getattr(self, name)}")
        if self.copy_rows < 0:
            raise ConfigError(f"{p}copy_rows must be >= 0, got {self.copy_rows}")
        if self.train_pick and self.train_pick < self.k:
            raise ConfigError(f"{p}train_pick must be 0 or >= k={self.k}, got {self.train_pick}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{p}warmup_steps must be >= 0, got {self.warmup_steps}")
        choices = {"key": KEYS, "index": KINDS, "storage": FORMATS, "on_stale": ("rebuild", "error")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{p}{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        for name in ("swap_prob", "max_overlap", "query_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{p}{name} must be in [0, 1], got {getattr(self, name)}")


def memory_layers(config) -> list[int]:
    """The blocks that read memory: ``model.memory_layers``, or the first half (the paper's choice)."""
    layers = config.memory_layers if config.memory_layers is not None else range(max(1, config.n_layer // 2))
    layers = sorted(set(layers))
    if not layers or layers[0] < 0 or layers[-1] >= config.n_layer:
        raise ConfigError(f"model.memory_layers must name blocks in [0, {config.n_layer}), got {layers}")
    return layers


# ---- writing memories -----------------------------------------------------------------------------


def encode_references(
    model: nn.Module, ids: Tensor, lengths: Tensor, *, layers: Sequence[int], keep: int
) -> Encoded:
    """Run references through ``model`` and keep, per memory layer and key-value head, the ``keep`` tokens that
    receive the most attention.

    ids: (R, n) token ids, BOS first, right-padded; lengths: (R,) real tokens (BOS included).
    Returns k, v: (R, len(layers), n_kv_head, keep, head_dim), keys after RoPE at positions 0..n-1 of the
    reference; n: (R,) filled slots = min(tokens after BOS, keep), the first n in reference order, the same in
    every layer and head (unfilled slots are zero); positions: (R, L, H, keep) token index of each slot.
    """
    from memlm.model.gpt import apply_rope

    cfg = model.config
    R, n = ids.shape
    nh, H, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    pos = torch.arange(n, device=ids.device)
    real = pos[None] < lengths[:, None]  # (R, n)
    candidate = real & (pos[None] > 0)  # BOS is the same in every memory: never worth a slot
    filled = torch.arange(keep, device=ids.device)[None] < (lengths - 1).clamp(min=0)[:, None]  # (R, keep)
    cos, sin = model.rope(pos.expand(R, n))
    x = model.wte(ids)  # (R, n, C)
    ks, vs, kept = [], [], []
    for i, block in enumerate(model.blocks[: layers[-1] + 1]):
        if i in layers:
            qkv = block.attn.wqkv(block.attn_norm(x)).view(R, n, nh + 2 * H, D).transpose(1, 2)
            q, k, v = qkv.split([nh, H, H], dim=1)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (R, nh | H, n, D)
            with torch.no_grad():
                idx = _most_attended(q, k, real, candidate, keep)  # (R, H, keep)
            gather = idx[..., None].expand(-1, -1, -1, D)
            zero = filled[:, None, :, None]
            ks.append(k.gather(2, gather) * zero)
            vs.append(v.gather(2, gather) * zero)
            kept.append(idx)
        if i < layers[-1]:  # the last memory layer needs only its keys and values
            x = block(x, cos, sin, None, None, None)  # the reference's own causal forward
    n_filled = filled.sum(-1)
    return Encoded(torch.stack(ks, 1), torch.stack(vs, 1), n_filled, torch.stack(kept, 1))


def _most_attended(q: Tensor, k: Tensor, real: Tensor, candidate: Tensor, keep: int) -> Tensor:
    """q (R, nh, n, D), k (R, H, n, D) -> (R, H, keep) token indices: the tokens each key-value head's queries
    (all of its query heads, every real position, no causal mask) attend to most, filled slots first, each
    head's in reference order."""
    R, nh, n, D = q.shape
    H = k.shape[1]
    scores = torch.einsum("rhgqd,rhkd->rhgqk", q.view(R, H, nh // H, n, D).float(), k.float()) / math.sqrt(D)
    scores = scores.masked_fill(~real[:, None, None, None, :], float("-inf"))
    probs = scores.softmax(-1) * real[:, None, None, :, None]  # padding queries give nothing
    received = probs.sum((2, 3)).masked_fill(~candidate[:, None], float("-inf"))  # (R, H, n)
    top = received.topk(min(keep, n), dim=-1)
    # Non-candidates (a reference shorter than keep) sort last, so slot j is filled iff j < tokens after BOS.
    order = (top.indices + n * torch.isinf(top.values)).sort(-1).values % n
    if order.shape[-1] < keep:
        order = torch.cat([order, order.new_zeros(R, H, keep - order.shape[-1])], -1)
    return order


# ---- reading memories -----------------------------------------------------------------------------


@dataclass
class Memories:
    """``MemoryContext.inputs`` of Memory³: the memories of a batch and which positions see which.

    slots: (B, G) index into the encoded references, -1 for none; the memory axis of layer j is
    G * keep wide. chunk_of (B, T) and slot_chunk (G,): position t sees the slots of its own chunk only
    (training: every chunk in one forward); None: every position sees every slot (generation reads one chunk's
    memories per call). ``encoded`` is None until the first memory layer asks: training then encodes ``refs``
    (R, n) with ``encoder`` inside the forward, so the loss reaches how memories are written.
    """

    slots: Tensor
    encoded: Encoded | None = None
    refs: Tensor | None = None
    ref_len: Tensor | None = None
    encoder: Callable[[Tensor, Tensor], Encoded] | None = None
    chunk_of: Tensor | None = None
    slot_chunk: Tensor | None = None
    entry_ids: list[list[int]] = field(default_factory=list)  # per row: the entries read (provenance)
    prompts: list[str] | None = None  # generation: the prompt texts, to retrieve with the text so far
    _mask: Tensor | None = None
    _layers: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # decoding reuses them every step

    def to(self, device: torch.device | str) -> Memories:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(
            self,
            slots=move(self.slots),
            encoded=None if self.encoded is None else self.encoded.to(device),
            refs=move(self.refs),
            ref_len=move(self.ref_len),
            chunk_of=move(self.chunk_of),
            slot_chunk=move(self.slot_chunk),
            _mask=None,
            _layers={},
        )

    def layer(self, j: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Memory layer ``j``'s keys, values (B, H, M, D) and mask (B, T | 1, M), M = G * keep.

        One row read by every position (batch-1 decoding) drops its unfilled slots instead: no mask, so a
        decoding step's attention needs none (``Attention`` then builds nothing per step)."""
        if self.encoded is None:
            self.encoded = self.encoder(self.refs, self.ref_len)
        enc = self.encoded
        B, G = self.slots.shape
        safe = self.slots.clamp(min=0)
        keep = enc.k.shape[3]
        if self._mask is None:
            ar = torch.arange(keep, device=safe.device)
            filled = (ar < enc.n[safe][..., None]) & (self.slots >= 0)[..., None]  # (B, G, keep)
            if self.chunk_of is not None:
                sees = self.chunk_of[:, :, None] == self.slot_chunk[None, None, :]  # (B, T, G)
                self._mask = (sees[..., None] & filled[:, None]).reshape(B, sees.shape[1], G * keep)
            else:
                self._mask = filled.reshape(B, 1, G * keep)
        unpadded = self.chunk_of is None and B == 1
        if j not in self._layers:
            k, v = enc.k[safe, j], enc.v[safe, j]  # (B, G, H, keep, D)
            H, D = k.shape[2], k.shape[4]
            k = k.permute(0, 2, 1, 3, 4).reshape(B, H, G * keep, D)
            v = v.permute(0, 2, 1, 3, 4).reshape(B, H, G * keep, D)
            if unpadded:
                filled = self._mask[0, 0].nonzero().squeeze(-1)
                k, v = k[:, :, filled], v[:, :, filled]
            self._layers[j] = (k, v)
        k, v = self._layers[j]
        return k, v, None if unpadded else self._mask


class MemoryKV(nn.Module):
    """The kv hook of one memory layer: no parameters, it hands the attention this layer's memory key-values."""

    def __init__(self, *, slot: int) -> None:
        super().__init__()
        self.slot = slot  # index among the memory layers

    def forward(self, memory: MemoryContext) -> tuple[Tensor, Tensor, Tensor] | None:
        inputs = memory.inputs
        return inputs.layer(self.slot) if isinstance(inputs, Memories) else None


@register_memory_design("memory3")
class Memory3(MemoryDesign):
    options_class = Memory3Options
    uses_bank = True

    def options(self, config) -> Memory3Options:
        options = super().options(config)
        memory_layers(config)  # refuse bad layers when the config loads
        if options.max_tokens + 1 > config.block_size:
            raise ConfigError("model.memory_options.max_tokens + 1 (BOS) must fit model.block_size")
        return options

    def layer_hooks(self, config, layer_idx: int) -> LayerHooks:
        layers = memory_layers(config)
        return LayerHooks(kv=MemoryKV(slot=layers.index(layer_idx))) if layer_idx in layers else LayerHooks()

    def reader(self, model, tokenizer, bank=None) -> Memory3Reader:
        return Memory3Reader(model, tokenizer, bank, self.options(model.config))


class Memory3Reader(RAGReader):
    """Retrieves like RAG (same retriever, same training query), but hands the model memories, not text."""

    def __init__(self, model, tokenizer, bank, options: Memory3Options) -> None:
        # RAG's retrieval state, without its text layout (separator, MEM token): the same search, swaps, cache.
        MemoryReader.__init__(self, model, tokenizer, bank)
        self.options, self.namespaces = options, options.namespaces
        self.check_bank(self.namespaces)
        self._retriever, self._train_hits, self._pools = None, {}, None
        self.layers = memory_layers(model.config)
        self.step: int | None = None  # set by the trainer; None (inference): memory on
        self._store: MemoryStore | None = None
        self._refs: dict[tuple[int, str], list[int]] = {}

    # ---- writing ----------------------------------------------------------------------------
    def reference_ids(self, text: str) -> list[int]:
        return [self.tokenizer.bos_id, *self.tokenizer.encode(text)[: self.options.max_tokens]]

    def _pad(self, refs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        n = max(len(r) for r in refs)
        ids = torch.full((len(refs), n), self.tokenizer.pad_id, dtype=torch.long)
        for i, r in enumerate(refs):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids, torch.tensor([len(r) for r in refs], dtype=torch.long)

    def encode(self, texts: Sequence[str], *, batch_size: int = 256) -> Encoded:
        """Entry texts -> memories with the model's current weights, no gradient, in batches of similar length."""
        refs = [self.reference_ids(t) for t in texts]
        order = sorted(range(len(refs)), key=lambda i: len(refs[i]))
        parts = []
        device = self.model.device if hasattr(self.model, "device") else torch.device("cpu")
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                ids, lengths = self._pad([refs[i] for i in order[s : s + batch_size]])
                e = encode_references(
                    self.model, ids.to(device), lengths.to(device), layers=self.layers, keep=self.options.keep
                )
                parts.append(Encoded(e.k.float().cpu(), e.v.float().cpu(), e.n.cpu(), e.positions.cpu()))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])[inverse]  # noqa: E731
        return Encoded(cat("k"), cat("v"), cat("n"), cat("positions"))

    @property
    def store(self) -> MemoryStore:
        if self._store is None:
            c, o = self.model.config, self.options
            settings = f"layers={self.layers};keep={o.keep};max_tokens={o.max_tokens};tok={self.tokenizer.fingerprint()}"
            self._store = MemoryStore(
                self.model,
                self.bank,
                encode=self.encode,
                settings=settings,
                shape=(len(self.layers), c.n_kv_head, o.keep, c.head_dim),
                storage=o.storage,
                pq_m=o.pq_m,
                cache_size=o.cache_size,
                on_stale=o.on_stale,
                precompute=o.precompute,
            )
        return self._store

    # ---- inference --------------------------------------------------------------------------
    def refresh(self) -> int:
        """Follow the bank's edits: the index, and the memories of changed entries (re-encoded now)."""
        n = self.retriever.refresh()
        self.store.refresh(reencode=True)
        return n

    def read(self, ids: Sequence[Sequence[int]], prompts: Sequence[str] | None = None) -> Memories:
        """Memories of the entries ``ids`` per row (best first); an entry deleted since the search is skipped."""
        entries = {e.id: e for e in self._entries(sorted({i for row in ids for i in row}))}
        rows = [[i for i in row if i in entries][: self.options.k] for row in ids]
        found = list(entries.values())
        c, o = self.model.config, self.options
        if found:
            enc = self.store.get(found)
        else:  # nothing to read: one empty memory, masked out
            zeros = torch.zeros(1, len(self.layers), c.n_kv_head, o.keep, c.head_dim)
            enc = Encoded(zeros, zeros, torch.zeros(1, dtype=torch.long))
        where = {e.id: j for j, e in enumerate(found)}
        width = max([o.k, *map(len, rows)])
        slots = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, row in enumerate(rows):
            slots[b, : len(row)] = torch.tensor([where[i] for i in row], dtype=torch.long)
        device = self.model.device if hasattr(self.model, "device") else torch.device("cpu")
        return Memories(slots=slots, encoded=enc, entry_ids=rows, prompts=list(prompts or [])).to(device)

    def prompts(self, prompts: Sequence[str]) -> PromptBatch:
        ids, scores = self.search(prompts)
        memories = self.read(ids, prompts)
        return PromptBatch(
            token_ids=self.tokenizer.encode_batch(list(prompts), bos=True),
            memory=MemoryContext(inputs=memories),
            used=memories.entry_ids,
            scores=scores,
        )

    def step_hook(self, batch: PromptBatch):
        """Every ``chunk`` generated tokens, retrieve again with the prompt and what was generated so far."""
        start = batch.memory.inputs if batch.memory is not None else None
        if not isinstance(start, Memories):
            return None
        C, prompts, tok = self.options.chunk, start.prompts, self.tokenizer

        def hook(state) -> None:
            if state.step == 0 or state.step % C:
                return
            live = [i for i in range(len(prompts)) if not state.finished[i]]
            if not live:
                return
            ids, scores = self.search([prompts[i] + tok.decode(state.tokens[i]) for i in live])
            rows = list(state.memory.inputs.entry_ids)  # finished rows keep theirs: nothing reads them
            for i, row in zip(live, ids):
                rows[i] = row
            state.memory = MemoryContext(inputs=self.read(rows, prompts))
            for i, sc in zip(live, scores):
                state.record(i, entry_ids=state.memory.inputs.entry_ids[i], kind="retrieve", scores=sc)

        return hook

    # ---- training ---------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        self.step = step

    def _layout(self, text: str) -> tuple[str, list[int], list[int]]:
        """(query, query ids, the rest's ids + EOS): the first chunk retrieves with the query."""
        query = query_text(text, self.options.query_chars)
        return (
            query,
            self.tokenizer.encode(query),
            [*self.tokenizer.encode(text[len(query) :]), self.tokenizer.eos_id],
        )

    def _chunks(self, query: str, q_len: int, rest: list[int], n_inputs: int) -> tuple[list[int], list[str]]:
        """Chunk starts (positions) and the text each chunk retrieves with: chunk c >= 1 starts at position
        q_len + c * chunk - 1 — where generation retrieves after c * chunk new tokens — and retrieves with every
        token up to and including that position, as the generator's step hook does."""
        C = self.options.chunk
        starts, queries = [0], [query]
        while (s := q_len + len(starts) * C - 1) < n_inputs:
            starts.append(s)
            queries.append(query + self.tokenizer.decode(rest[: (len(starts) - 1) * C]))
        return starts, queries

    def prepare_training(self, texts: Sequence[str], *, progress: bool = False) -> None:
        """Retrieve once for every chunk of every training document (as written; swaps retrieve on the fly)."""
        queries = []
        for text in texts:
            query, q, rest = self._layout(text)
            queries += self._chunks(query, 1 + len(q), rest, min(len(q) + len(rest), self.block_size))[1]
        self._hits(queries, progress=progress)

    def _hits(self, queries: Sequence[str], *, progress: bool = False) -> list[list[int]]:
        from tqdm import tqdm

        missing = [q for q in dict.fromkeys(queries) if q not in self._train_hits]
        bar = tqdm(
            total=len(missing), desc="memory3: retrieve for training", unit=" chunks", disable=not progress
        )
        width = max(self.options.k, self.options.train_pick)
        for i in range(0, len(missing), 512):
            part = missing[i : i + 512]
            ids, _ = self.search(part, width)
            self._train_hits.update(zip(part, ids))
            bar.update(len(part))
        bar.close()
        return [self._train_hits[q] for q in queries]

    def train_batch(
        self, texts: Sequence[str], *, rng: random.Random | None = None, train: bool = True
    ) -> TrainBatch:
        if self.step is not None and self.step < self.options.warmup_steps:
            return MemoryReader.train_batch(self, texts, rng=rng, train=train)  # stage 1: no memory
        o, tok = self.options, self.tokenizer
        swap = o.swap_prob if train and rng is not None else 0.0
        docs = []  # per document: row, query length, chunk starts, chunk queries, text rewrite
        for text in texts:
            rewrite, first_query = None, query_text(text, o.query_chars)
            # New objects for what the first chunk reads (as RAG), applied to everything the document reads.
            if swap > 0:
                if self._pools is None:
                    self._pools = object_pools(self.bank, self.namespaces)
                rewrite = object_swapper(self._entries(self._hits([first_query])[0]), rng, swap, self._pools)
                text = rewrite(text)
            query, q, rest = self._layout(text)
            row = [tok.bos_id, *q, *rest]
            starts, queries = self._chunks(query, 1 + len(q), rest, min(len(row) - 1, self.block_size))
            queries[0] = first_query  # the first chunk reads what the swaps were drawn from
            docs.append((row, 1 + len(q), starts, queries, rewrite))
        hits = self._hits([q for d in docs for q in d[3]])

        n_chunks = max(len(d[2]) for d in docs)
        slots = torch.full((len(docs), n_chunks * o.k), -1, dtype=torch.long)
        refs: dict[tuple[int, ...], int] = {}
        # reference -> the entry it was read as (the provenance of a copy row)
        copied: dict[tuple[int, ...], int] = {}
        used, at = [], 0
        pick = o.train_pick if train else 0
        for b, (row, q_len, starts, _, rewrite) in enumerate(docs):
            seen, read = set(row), []
            for c, start in enumerate(starts):
                found = []  # (entry, reference ids), best first, without (near-)copies of the document
                for e in self._entries(hits[at + c]):
                    ref = tuple(self._reference(e, rewrite))
                    if sum(t in seen for t in ref[1:]) <= o.max_overlap * max(len(ref) - 1, 1):
                        found.append((e, ref))
                if pick:  # teacher forcing: what the document names from this chunk on goes first
                    said = tok.decode(row[max(start, q_len - 1) + 1 :])
                    named = [
                        f for f in found[:pick] if f[0].object and _names(said, (rewrite or str)(f[0].object))
                    ]
                    found = named + [f for f in found if f not in named]
                for j, (e, ref) in enumerate(found[: o.k]):
                    slots[b, c * o.k + j] = refs.setdefault(ref, len(refs))
                    copied.setdefault(ref, e.id)
                    read += [] if e.id in read else [e.id]
            at += len(starts)
            used.append(read)
        if o.query_noise > 0 and train and rng is not None:  # the question hidden, the memory is the answer
            for row, q_len, *_ in docs:
                row[1:q_len] = [self._noise(t, rng) for t in row[1:q_len]]  # RAG's: never a special token
        if o.copy_rows and train and rng is not None and refs:
            # Copy rows: a read reference spelt out while reading its own memory (one chunk, loss on every
            # token after BOS): docs gains rows, slots gains their memory.
            readable = [(ref, slot) for ref, slot in refs.items() if len(ref) > 1]
            chosen = rng.sample(readable, min(o.copy_rows, len(readable)))
            extra = torch.full((len(chosen), slots.shape[1]), -1, dtype=torch.long)
            for i, (ref, slot) in enumerate(chosen):
                docs.append(([*ref, tok.eos_id], 1, [0], [], None))
                extra[i, 0] = slot
                used.append([copied[ref]])
            slots = torch.cat([slots, extra])
        batch = self.collate(
            [d[0] for d in docs], [d[1] for d in docs], query_len=[d[1] for d in docs], used=used
        )
        T = batch.input_ids.shape[1]
        starts = torch.full((len(docs), n_chunks), T, dtype=torch.long)  # absent chunks start past the end
        for b, d in enumerate(docs):
            starts[b, : len(d[2])] = torch.tensor(d[2])
        chunk_of = (torch.arange(T)[None, :, None] >= starts[:, None, :]).sum(-1) - 1  # (B, T)
        if not refs:  # nothing read by anyone: one empty reference, masked out
            refs[(tok.bos_id,)] = 0
        ids, lengths = self._pad(list(refs))
        batch.memory = MemoryContext(
            inputs=Memories(
                slots=slots,
                refs=ids,
                ref_len=lengths,
                encoder=self._train_encoder,
                chunk_of=chunk_of,
                slot_chunk=torch.arange(n_chunks * o.k) // o.k,
                entry_ids=used,
            )
        )
        return batch

    def _reference(self, entry, rewrite: Callable[[str], str] | None) -> list[int]:
        if rewrite is not None and (text := rewrite(entry.text)) != entry.text:
            return self.reference_ids(text)  # a swapped entry: tokenise, do not cache
        key = (entry.id, entry.content_hash)
        if key not in self._refs:
            self._refs[key] = self.reference_ids(entry.text)
        return self._refs[key]

    def _train_encoder(self, ids: Tensor, lengths: Tensor) -> Encoded:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.options.encode_grad):
            return encode_references(self.model, ids, lengths, layers=self.layers, keep=self.options.keep)
