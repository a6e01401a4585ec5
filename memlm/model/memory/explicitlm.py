"""ExplicitLM: every token retrieves readable token-sequence memories from the bank and reads them.

Paper: "ExplicitLM: Decoupling Knowledge from Parameters via Explicit Memory Banks" (arXiv 2511.01581; seed
000). Memory is the bank's entries as token sequences; at the memory layers each token's normed hidden state is
projected to a query, a coarse product-key stage proposes candidates, a fine Gumbel-softmax stage picks the
entries to read, and the token reads them.

What memlm does differently from the public code (``../shared/DESIGN.md``):

- Keys are the entries' own: an order-aware encoder makes each entry's key from what it is *about* (subject +
  relation, ``bank.vectors.KEYS["about"]``; a question never contains its answer) and its token states from its
  full text. The product keys' sub-keys are k-means centroids of those keys (:mod:`.pk_search`), refit every
  ``refresh_every`` training steps, so an edited entry is re-placed and routing follows the content.
- The coarse stage learns: candidates are scored exactly with freshly encoded keys, differentiable in both the
  query projection and the key encoder (the public code's product keys get no gradient: random routing), plus
  an optional auxiliary retrieval loss from the gold entry the data knows (``retrieval_weight``).
- Fusion is a tanh-gated cross-attention from the token to the selected entries' token states, with a null
  slot: an empty bank or a closed gate (``gate_init: 0``) gives exactly the base model's logits (the public
  code puts a SwiGLU over [query; mean embedding] in place of the FFN). The gate starts open (see
  ``ExplicitLMLayer``), and ``teacher_forcing`` lets gold positions read their gold entry in training.
- An explicit temperature schedule (``tau_start`` -> ``tau_end`` over ``tau_steps``), straight-through in
  training, hard top-``read_k`` at inference.
- Entries stay readable: nothing the optimiser does rewrites a bank entry (the public code's EMA overwrites
  the token ids of non-frozen entries). The optional implicit region of learnable slots (``implicit_ratio``,
  paper 0.8) lives in its own flagged store, :class:`ImplicitSlots`, trained by the optimiser.
- Search is batched over every token of every row, O(sqrt N) per token; the bank is followed through its
  edit log, so edits and deletions reach the next forward call with no training.

Causality: a position's query is its own hidden state (tokens <= t); entries never contain the sample's
tokens. The gold entry of a position is used only in the auxiliary loss, never in what the position reads.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.errors import ConfigError
from memlm.model.memory.base import LayerHooks, MemoryContext, MemoryDesign
from memlm.model.memory.parts import join_halves, part_tokens
from memlm.model.memory.pk_search import ProductKeySearch
from memlm.model.memory.question import QuestionReader, read_mask
from memlm.model.memory.reader import MemoryReader, PromptBatch, TrainBatch, as_in_a_sentence
from memlm.model.memory.registry import register_memory_design
from memlm.model.memory.row_index import INDEXES, RowIndex


@dataclass
class ExplicitLMOptions:
    key: str = "about"  # what keys are made from: about (subject + relation) | text (bank.vectors.KEYS)
    # | parts: subject and relation encoded apart, one half of the key each — the product keys' two halves,
    # so a cell is (people like this one) x (relations like this one)
    key_dim: int = 128  # query/key size, split in halves for the product keys
    key_tokens: int = 16  # the key text is cut to this many tokens
    text_tokens: int = 32  # an entry's text (what is read) is cut to this many tokens (the paper: 16)
    state_next: bool = False  # token states also hold the next token's embedding, so the word before a value
    # ("works for") names the value's first token: one seed's fusion read values from their end (the "." after
    # them) and this rescued it; another seed read fine without it and worse with it (results_explicitlm.md)
    read_k: int = 1  # entries each token reads (the paper: 1)
    fine_k: int = 8  # coarse candidates the fine stage scores with fresh keys (the paper keeps 16)
    topk_half: int = 8  # sub-keys kept per half
    n_cells: int = 4  # cells of the cartesian product searched per token
    cell_size: int = 16  # mean entries per cell: K = ceil(sqrt(N / cell_size)) sub-keys per half
    cell_cap: int = 32  # entries a cell holds (a key whose best cell is full goes to the next-best one)
    refresh_every: int = 100  # training steps between re-encoding every key and refitting the sub-keys
    score_scale: float = 16.0  # logits = scale * cosine(query, key)
    tau_start: float = 1.0  # Gumbel-softmax temperature at step 0 ...
    tau_end: float = 0.1  # ... decayed exponentially to this at tau_steps (the paper: 1.0 throughout)
    tau_steps: int = 3000
    retrieval_weight: float = 1.0  # auxiliary CE toward the gold entry, where the data knows it (0: off)
    teacher_forcing: float = 0.0  # training: share of gold positions that read the gold entry, not their pick
    retrieval_negatives: str = "batch"  # batch: candidates + the batch's golds | all: every key as well
    gate_init: float = 1.0  # fusion gate tanh(g) at init; 0 closes it, and a closed gate barely opens (below)
    similarity_weight: float = 0.1  # the paper's: 1 - cos(query, key of the selected entry)
    diversity_weight: float = 0.05  # the paper's: KL(mean sub-key distribution || uniform), per half
    swap_prob: float = 0.5  # training: share of a sample's facts whose object is swapped in text and entry
    # training: share of the words before a text's first object (in its first sentence or line, not its
    # subject's name) replaced by random tokens, so the reading follows the entry read, not the wording
    cue_noise: float = 0.0
    implicit_ratio: float = 0.0  # share of memory slots that are learnable (the paper: 0.8); 0: none
    bank_size: int = 0  # entries the ratio is taken of (slots = bank_size * r / (1 - r)); needed when r > 0
    implicit_tokens: int = 4  # token states per learnable slot
    namespaces: list[str] | None = None  # retrieval scope; None: every namespace of the bank
    # A pretrained reader of the question (memlm.model.memory.question; e.g. minilm): positions that have read
    # a text's first sentence or line retrieve by its embedding against that encoder's vectors of the entries'
    # keys (RAG's search), scored by that similarity; the learnt query retrieves everywhere else. None: off
    query_encoder: str | None = None
    query_encoder_dim: int = 384  # that encoder's output width (minilm: 384)
    text_index: str = "auto"  # the question's search: exact (torch) | faiss | auto: FAISS from 50,000 entries

    def __post_init__(self) -> None:
        from memlm.bank.vectors import KEYS

        if self.retrieval_negatives not in ("batch", "all"):
            raise ConfigError(
                f"model.memory_options.retrieval_negatives must be 'batch' or 'all', got {self.retrieval_negatives!r}"
            )
        if self.key not in (*KEYS, "parts"):
            raise ConfigError(
                f"model.memory_options.key must be one of {[*sorted(KEYS), 'parts']}, got {self.key!r}"
            )
        if self.key_dim < 2 or self.key_dim % 2:
            raise ConfigError(f"model.memory_options.key_dim must be even and >= 2, got {self.key_dim}")
        for name in ("key_tokens", "text_tokens", "read_k", "fine_k", "topk_half", "n_cells", "cell_size",
                     "cell_cap", "refresh_every", "tau_steps", "implicit_tokens", "query_encoder_dim"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"model.memory_options.{name} must be >= 1, got {getattr(self, name)}")
        if self.text_index not in INDEXES:
            raise ConfigError(
                f"model.memory_options.text_index must be one of {list(INDEXES)}, got {self.text_index!r}"
            )
        if self.read_k > self.fine_k:
            raise ConfigError(
                f"model.memory_options.read_k ({self.read_k}) must be <= fine_k ({self.fine_k})"
            )
        if not 0 < self.tau_end <= self.tau_start:
            raise ConfigError("model.memory_options: need 0 < tau_end <= tau_start")
        for name in ("swap_prob", "cue_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"model.memory_options.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.implicit_ratio < 1.0:
            raise ConfigError(
                f"model.memory_options.implicit_ratio must be in [0, 1), got {self.implicit_ratio}"
            )
        if self.implicit_ratio > 0 and self.bank_size < 1:
            raise ConfigError(
                "model.memory_options.bank_size (entries in the bank) is needed when implicit_ratio > 0"
            )
        if not 0.0 <= self.teacher_forcing <= 1.0:
            raise ConfigError(
                f"model.memory_options.teacher_forcing must be in [0, 1], got {self.teacher_forcing}"
            )
        for name in ("retrieval_weight", "similarity_weight", "diversity_weight", "score_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.memory_options.{name} must be >= 0")

    @property
    def implicit_slots(self) -> int:
        r = self.implicit_ratio
        return round(self.bank_size * r / (1 - r)) if r > 0 else 0


# ---- the model-wide part: entry encoder, implicit slots, step counter --------------------------------------
class ImplicitSlots(nn.Module):
    """The implicit region: learnable slots, each a key and a few token states, trained by the optimiser.

    A store of its own (``flag``), never mixed with the bank's entries; a slot is reported with id -2 - slot.
    """

    flag = "implicit"

    def __init__(self, *, slots: int, tokens: int, n_embd: int, key_dim: int) -> None:
        super().__init__()
        self.keys = nn.Parameter(F.normalize(torch.randn(slots, key_dim), dim=1))
        self.states = nn.Parameter(torch.randn(slots, tokens, n_embd) * 0.02)


class EntryEncoder(nn.Module):
    """Entries -> keys and token states, shared by every memory layer; reads the backbone's token embeddings.

    Keys: a position-gated sum of the key text's token embeddings (order-aware: swapping two tokens changes the
    key), then an MLP; unit length. Cheap per entry, because the fine stage re-encodes its candidates' keys at
    every step. Token states: embedding + entry position + the previous token's embedding (so a state knows
    what precedes it: the cue for copying a multi-token value) + with ``state_next`` the next token's (an entry
    is memory, not the sample: reading ahead in it is not reading the sample's future) + an MLP.
    """

    def __init__(self, *, n_embd: int, o: ExplicitLMOptions) -> None:
        super().__init__()
        C = n_embd
        self.key_gate = nn.Parameter(torch.ones(o.key_tokens, C))
        self.key_norm = nn.RMSNorm(C)
        self.key_mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.SiLU(), nn.Linear(2 * C, C))
        self.key_dim, parts = o.key_dim, o.key == "parts"
        self.key_out = nn.Linear(C, o.key_dim // 2 if parts else o.key_dim, bias=False)
        if parts:  # the relation's own encoder, for the key's second half (memlm/model/memory/parts.py)
            self.relation_gate = nn.Parameter(torch.ones(o.key_tokens, C))
            self.relation_norm = nn.RMSNorm(C)
            self.relation_mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.SiLU(), nn.Linear(2 * C, C))
            self.relation_out = nn.Linear(C, o.key_dim // 2, bias=False)
        self.text_pos = nn.Parameter(torch.randn(o.text_tokens, C) * 0.02)
        self.prev = nn.Linear(C, C, bias=False)
        self.next = nn.Linear(C, C, bias=False) if o.state_next else None
        self.text_norm = nn.RMSNorm(C)
        self.text_mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.SiLU(), nn.Linear(2 * C, C))
        relation = (self.relation_mlp[0], self.relation_mlp[2], self.relation_out) if parts else ()
        for lin in (
            self.key_mlp[0],
            self.key_mlp[2],
            self.key_out,
            self.prev,
            *([self.next] if self.next is not None else []),
            self.text_mlp[0],
            self.text_mlp[2],
            *relation,
        ):
            nn.init.normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.implicit = (
            ImplicitSlots(slots=o.implicit_slots, tokens=o.implicit_tokens, n_embd=C, key_dim=o.key_dim)
            if o.implicit_slots
            else None
        )
        # Training forward calls so far: drives the temperature schedule and the key-table refreshes, and is
        # saved with the weights, so a resumed run refreshes at the same steps.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def keys(self, tokens: Tensor, embed: nn.Embedding, pad_id: int, split: Tensor | None = None) -> Tensor:
        """(U, Lk) key-text token ids -> (U, key_dim) unit keys.

        ``split`` (U,) (``key: parts``): the first ``split`` tokens are the subject, the rest the relation,
        each encoded on its own from its own first position; the key is both unit halves over sqrt(2) (an
        entry without a relation, split == its length, encodes its whole text into both)."""
        if split is None:
            return F.normalize(self.key_out(self._pooled(tokens, embed, pad_id, "key")), dim=-1)
        L = tokens.shape[1]
        pos = torch.arange(L, device=tokens.device)[None]
        length = (tokens != pad_id).sum(1, keepdim=True)
        whole = split[:, None] >= length  # no relation: both halves read the whole text
        subject = tokens.masked_fill((pos >= split[:, None]) & ~whole, pad_id)
        at = pos + torch.where(whole, 0, split[:, None])  # the relation's tokens moved to the front
        relation = tokens.gather(1, at.clamp(max=L - 1)).masked_fill(at >= L, pad_id)
        s = self.key_out(self._pooled(subject, embed, pad_id, "key"))
        r = self.relation_out(self._pooled(relation, embed, pad_id, "relation"))
        return join_halves(s, r)

    def _pooled(self, tokens: Tensor, embed: nn.Embedding, pad_id: int, part: str) -> Tensor:
        """A position-gated sum of the tokens' embeddings (order-aware), then a residual MLP: (U, C)."""
        e = embed(tokens) * getattr(self, f"{part}_gate")[: tokens.shape[1]]  # (U, Lk, C)
        mask = (tokens != pad_id).unsqueeze(-1)
        h = (e * mask).sum(1) / mask.sum(1).clamp(min=1).sqrt()  # (U, C)
        return h + getattr(self, f"{part}_mlp")(getattr(self, f"{part}_norm")(h))

    def states(self, tokens: Tensor, embed: nn.Embedding, pad_id: int) -> Tensor:
        """(U, L) entry-text token ids -> (U, L, C) token states."""
        e = embed(tokens)  # (U, L, C)
        x = e + self.text_pos[: tokens.shape[1]] + self.prev(F.pad(e, (0, 0, 1, 0))[:, :-1])
        if self.next is not None:  # the last token's next is nothing (PAD reads as zero)
            after = (e * (tokens != pad_id).unsqueeze(-1))[:, 1:]
            x = x + self.next(F.pad(after, (0, 0, 0, 1)))
        return x + self.text_mlp(self.text_norm(x))


# ---- the table the model searches -------------------------------------------------------------------------
class EntryTable:
    """What the memory layers search: rows [0, M) are the implicit slots, rows [M, ...) the bank's entries.

    Per explicit row: the bank id, the key text and the entry text as token ids (cut/padded), and whether it is
    alive (a deleted entry's row is dead and zeroed). Keys are cached here (no gradient) for the coarse stage
    and refreshed from the model by the reader; the product-key search is built over them.
    """

    def __init__(self, *, n_implicit: int, o: ExplicitLMOptions, pad_id: int) -> None:
        self.M, self.pad_id = n_implicit, pad_id
        self.ids = torch.full((n_implicit,), -1, dtype=torch.long) - 1 - torch.arange(n_implicit)  # -2 - slot
        self.key_tokens = torch.full((n_implicit, o.key_tokens), pad_id, dtype=torch.long)
        # key: parts — per row, the subject's tokens at the start of key_tokens; None: one key text
        self.key_split = torch.zeros(n_implicit, dtype=torch.long) if o.key == "parts" else None
        self.text_tokens = torch.full((n_implicit, o.text_tokens), pad_id, dtype=torch.long)
        self.alive = torch.ones(n_implicit, dtype=torch.bool)
        # query_encoder: that encoder's vectors of the rows' keys and their search (slots, dead rows: none)
        self.text: RowIndex | None = None
        self.text_index = o.text_index
        self.search = ProductKeySearch(
            o.key_dim, cell_size=o.cell_size, topk_half=o.topk_half, n_cells=o.n_cells, cell_cap=o.cell_cap
        )
        self.key_step: int | None = None  # the encoder step the cached keys were made at; None: none yet
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_explicit(self) -> int:
        return int(self.alive[self.M :].sum())

    def to(self, device: torch.device | str) -> EntryTable:
        device = torch.device(device)
        if device != self.device:
            for name in ("ids", "key_tokens", "text_tokens", "alive", "key_split"):
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name).to(device))
            if self.text is not None:
                self.text.to(device)
            self.search.to(device)
            self.device = device
        return self

    def set_rows(
        self, rows: Tensor, ids: Tensor, key_tokens: Tensor, text_tokens: Tensor, alive: Tensor,
        key_split: Tensor | None = None,
    ) -> None:  # fmt: skip
        """Write explicit rows (rows past the end extend the table); a dead row keeps no tokens."""
        end = int(rows.max()) + 1 if len(rows) else 0
        if end > len(self):
            grow = end - len(self)
            self.ids = torch.cat([self.ids, self.ids.new_full((grow,), -1)])
            self.key_tokens = torch.cat(
                [self.key_tokens, self.key_tokens.new_full((grow, self.key_tokens.shape[1]), self.pad_id)]
            )
            self.text_tokens = torch.cat(
                [self.text_tokens, self.text_tokens.new_full((grow, self.text_tokens.shape[1]), self.pad_id)]
            )
            self.alive = torch.cat([self.alive, self.alive.new_zeros(grow)])
            if self.key_split is not None:
                self.key_split = torch.cat([self.key_split, self.key_split.new_zeros(grow)])
            if self.text is not None:
                self.text.grow(len(self))
        rows, alive = rows.to(self.device), alive.to(self.device)
        self.ids[rows] = ids.to(self.device).masked_fill(~alive, -1)
        self.key_tokens[rows] = key_tokens.to(self.device).masked_fill(~alive[:, None], self.pad_id)
        self.text_tokens[rows] = text_tokens.to(self.device).masked_fill(~alive[:, None], self.pad_id)
        self.alive[rows] = alive
        if self.key_split is not None:
            self.key_split[rows] = key_split.to(self.device).masked_fill(~alive, 0)
        if self.text is not None:  # a dead row is never found by the question again
            self.text.remove(rows[~alive])

    def set_text_keys(self, rows: Tensor, vectors: Tensor) -> None:
        """The query encoder's vectors (n, E) of live explicit ``rows`` (set after :meth:`set_rows`)."""
        if self.text is None:
            self.text = RowIndex(vectors.shape[1], index=self.text_index, device=self.device)
            self.text.grow(len(self))
        self.text.set(rows, vectors)

    @property
    def text_keys(self) -> Tensor | None:
        """(len, E) the query encoder's vectors by row (zeros for slots and dead rows); None: no query encoder."""
        return None if self.text is None else self.text.vectors

    def search_text(self, queries: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Query encoder embeddings (Q, E) -> (cosines, rows), each (Q, n), best first, over the live explicit
        rows (one search per text, not per token; FAISS at scale); -inf and -1 where fewer than n are alive."""
        if self.text is None:
            raise ValueError("this entry table has no text keys (query_encoder sets them)")
        return self.text.search(queries, n)

    @torch.no_grad()
    def encode_keys(self, encoder: EntryEncoder, embed: nn.Embedding, rows: Tensor | None = None) -> Tensor:
        """Current keys of ``rows`` (default: all), in chunks (a maintenance pass, not the forward)."""
        rows = torch.arange(len(self), device=self.device) if rows is None else rows.to(self.device)
        out = [fresh_keys(encoder, embed, self, rows[i : i + 8192]) for i in range(0, len(rows), 8192)]
        return torch.cat(out) if out else torch.zeros(0, encoder.key_dim, device=self.device)


def fresh_keys(encoder: EntryEncoder, embed: nn.Embedding, table: EntryTable, rows: Tensor) -> Tensor:
    """(U,) table rows -> (U, key_dim) keys with gradient: slots' learned keys, entries' encoded key texts."""

    def encoded(r: Tensor) -> Tensor:
        split = None if table.key_split is None else table.key_split[r]
        return encoder.keys(table.key_tokens[r], embed, table.pad_id, split)

    if not table.M:
        return encoded(rows)
    slot = rows < table.M
    keys = torch.zeros(len(rows), encoder.key_dim, device=rows.device)
    keys[~slot] = encoded(rows[~slot])
    keys[slot] = F.normalize(encoder.implicit.keys[rows[slot]], dim=-1)
    return keys


@dataclass
class ExplicitInputs:
    """``MemoryContext.inputs`` of this design: the table, the backbone's embeddings, and per-batch extras."""

    table: EntryTable
    embed: nn.Embedding
    gold: Tensor | None = None  # (B, T) row of the entry whose object the next token spells, -1: none
    valid: Tensor | None = None  # (B, T) real tokens (retrieval skips padding); None: every position
    swap_rows: Tensor | None = None  # (B, S) rows this sample reads with a swapped object, -1: none
    swap_tokens: Tensor | None = None  # (B, S, L) their swapped text tokens
    text: Tensor | None = None  # (B, E) query_encoder's embedding of each row's first sentence or line
    text_mask: Tensor | None = None  # (B, T) positions that have read it (aligned like the input ids)
    reads: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, T, read_k) ids read (provenance)
    # query_encoder — n -> (cosines, rows), each (B, n): the text's search, once per batch (not per decoding step)
    text_hits: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # layer -> (weights' versions, rows, keys/values, mask) of the entries it last read (no gradient)
    read_kv: dict[int, tuple] = field(default_factory=dict)

    def search_text(self, n: int) -> tuple[Tensor, Tensor]:
        if n not in self.text_hits:
            self.text_hits[n] = self.table.search_text(self.text, n)
        return self.text_hits[n]

    def to(self, device: torch.device) -> ExplicitInputs:
        self.table.to(device)
        for name in ("gold", "valid", "swap_rows", "swap_tokens", "text", "text_mask"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device, non_blocking=True))
        return self


# ---- the per-layer part: retrieval + gated cross-attention -------------------------------------------------
class ExplicitLMLayer(nn.Module):
    """The ``cross`` hook of one memory layer: (B, T, C) normed hidden states -> (B, T, C) added to the residual."""

    def __init__(
        self,
        *,
        n_embd: int,
        n_head: int,
        o: ExplicitLMOptions,
        encoder: EntryEncoder,
        layer_idx: int,
        first: bool,
    ) -> None:
        super().__init__()
        self.o, self.layer_idx, self.first = o, layer_idx, first
        self.n_head, self.head_dim = n_head, n_embd // n_head
        object.__setattr__(self, "encoder", encoder)  # a plain reference: the model registers it once
        self.query = nn.Linear(n_embd, o.key_dim, bias=False)
        self.wq = nn.Linear(n_embd, n_embd, bias=False)
        self.wkv = nn.Linear(n_embd, 2 * n_embd, bias=False)
        self.wo = nn.Linear(n_embd, n_embd, bias=False)
        self.null_key = nn.Parameter(torch.randn(n_head, self.head_dim) * 0.02)  # its value is zero
        # Open at init. A zero gate starts at a saddle: wq, wkv and wo get gradient times tanh(g) = 0, and g
        # gets gradient through wo's small random output only; a 2,000-step run ended with g = 0.0012 and
        # never read (docs/results_explicitlm.md). An empty bank still gives the base model (nothing is read).
        self.gate = nn.Parameter(torch.tensor(float(o.gate_init)))
        for lin in (self.query, self.wq, self.wkv, self.wo):
            nn.init.normal_(lin.weight, std=0.02)

    def tau(self) -> float:
        o, step = self.o, int(self.encoder.step)
        return o.tau_start * (o.tau_end / o.tau_start) ** min(1.0, step / o.tau_steps)

    def forward(self, h: Tensor, memory: MemoryContext | None) -> Tensor:
        inputs = memory.inputs if memory is not None else None
        if not isinstance(inputs, ExplicitInputs):
            return torch.zeros_like(h)
        if self.training and self.first:
            self.encoder.step += 1
        B, T, C = h.shape
        table, o = inputs.table, self.o
        where = (
            inputs.valid.flatten()
            if inputs.valid is not None
            else torch.ones(B * T, dtype=torch.bool, device=h.device)
        )
        pos = torch.nonzero(where).flatten()  # positions that retrieve
        ids = torch.full((B * T, o.read_k), -1, dtype=torch.long, device=h.device)
        out = torch.zeros(B * T, C, dtype=h.dtype, device=h.device)
        if table.search.n_alive == 0 or len(pos) == 0:
            self._record(memory, ids.view(B, T, -1))
            return out.view(B, T, C)

        x = h.flatten(0, 1)[pos]  # (n, C)
        q = self.retrieval_query(x)  # (n, key_dim)
        by_text = None  # (n,): the positions that retrieve by the question (query_encoder)
        if inputs.text is None:
            _, cand = table.search.search(q.detach(), o.fine_k)  # coarse: cells + cached keys, (n, m)
        else:
            by_text = read_mask(inputs.text, inputs.text_mask, T, "ExplicitLM").flatten()[pos]
            t_sim, t_rows = inputs.search_text(o.fine_k)  # (B, m): once per row and batch
            cand = t_rows[pos // T].clone()
            if (~by_text).any():  # the coarse search only where the question is not read (decoding: nowhere)
                cand[~by_text] = table.search.search(q.detach()[~by_text], o.fine_k)[1]
        gold = inputs.gold.flatten()[pos] if self.training and inputs.gold is not None else None
        extra = cand.new_zeros(0)  # gold rows the retrieval loss scores: where the learnt query retrieved
        if gold is not None and o.retrieval_weight > 0:
            extra = gold[gold >= 0] if by_text is None else gold[(gold >= 0) & ~by_text]
        # Fresh keys only for the learnt query's candidates: the question's picks are scored by its similarity.
        learnt = slice(None) if by_text is None else ~by_text
        own = cand[learnt]  # (n_learnt, m)
        uniq, inv = torch.unique(torch.cat([own.flatten().clamp(min=0), extra]), return_inverse=True)
        if len(uniq):
            keys = fresh_keys(self.encoder, inputs.embed, table, uniq)  # (U, d) with gradient
        else:  # every position picks by the question (decoding after a prompt)
            keys = q.new_zeros(0, q.shape[1])
        cand_keys = keys[inv[: own.numel()]].view(*own.shape, keys.shape[1])  # (n_learnt, m, d)
        scores = o.score_scale * torch.einsum("nd,nmd->nm", q[learnt], cand_keys)
        if by_text is not None:  # the question's similarity picks there (fixed: nothing to learn)
            text_scores = (o.score_scale * t_sim[pos // T]).to(scores.dtype)
            text_scores[~by_text] = scores
            scores = text_scores
        scores = scores.masked_fill(cand < 0, float("-inf"))  # fine stage: exact, differentiable

        found = torch.isfinite(scores).any(
            1, keepdim=True
        )  # a token whose cells were all empty reads nothing
        if self.training:  # Gumbel top-k, straight-through: forward reads hard picks, backward sees soft ones
            g = -torch.log(-torch.log(torch.rand_like(scores).clamp(1e-9, 1 - 1e-9)))
            y = (scores.masked_fill(~found, 0.0) + g) / self.tau()
            pick = y.topk(o.read_k, dim=1).indices  # (n, k)
            soft = y.softmax(-1).gather(1, pick)
            weight = 1.0 + soft - soft.detach()
        else:
            pick = scores.topk(o.read_k, dim=1).indices
            weight = torch.ones_like(pick, dtype=q.dtype)
        rows = cand.gather(1, pick).masked_fill(~torch.isfinite(scores.gather(1, pick)), -1)  # (n, k)
        if gold is not None and o.teacher_forcing > 0:
            # Teacher forcing: some gold positions read their gold entry whatever the search found, so reading
            # is learnt before retrieval is good (the pick's straight-through weight is dropped there: the
            # retrieval loss trains the query). Inference reads the pick.
            force = (gold >= 0) & (torch.rand(len(gold), device=gold.device) < o.teacher_forcing)
            rows[:, 0] = torch.where(force, gold, rows[:, 0])
            weight = torch.where(force[:, None] & (torch.arange(o.read_k, device=h.device) == 0), 1.0, weight)
        weight = weight.masked_fill(rows < 0, 0.0)
        ids[pos] = torch.where(rows >= 0, table.ids[rows.clamp(min=0)], -1)
        self._record(memory, ids.view(B, T, -1))

        if self.training:  # the learnt query's losses, where it retrieved
            self._aux_losses(
                memory, q[learnt], scores[learnt], own, pick[learnt], cand_keys,
                None if gold is None else gold[learnt], uniq, keys, table,
            )  # fmt: skip
        out[pos] = self._read(x, rows, weight, inputs, pos // T).to(out.dtype)
        return out.view(B, T, C)

    def retrieval_query(self, x: Tensor) -> Tensor:
        """Unit queries (..., key_dim), float32, from hidden states (..., C); ``key: parts``: two unit halves,
        as the keys."""
        q = self.query(x).float()
        return join_halves(*q.chunk(2, dim=-1)) if self.o.key == "parts" else F.normalize(q, dim=-1)

    def _entry_kv(self, uniq: Tensor, inputs: ExplicitInputs, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The keys/values (U, L, 2C) and token mask (U, L) of the rows ``uniq`` read (swapped copies past the
        table's end).

        Without gradient they are kept for the batch while the rows and the weights stay the same: a decoding
        step reads the entries the prompt read (the question's picks), and would otherwise encode them again.
        """
        table = inputs.table
        swaps = inputs.swap_tokens is not None and inputs.swap_tokens.numel() > 0
        memo = None
        if not torch.is_grad_enabled() and not swaps:
            # the weights and the entries' tokens: moved or updated in place (an optimizer, an edit), computed again
            depends = (*self.parameters(), *self.encoder.parameters(), inputs.embed.weight, table.text_tokens)
            memo = tuple((p.data_ptr(), p._version) for p in depends)
            kept = inputs.read_kv.get(self.layer_idx)
            if kept is not None and kept[0] == memo and torch.equal(kept[1], uniq):
                return kept[2], kept[3]
        tokens = table.text_tokens[uniq.clamp(max=len(table) - 1)]
        if swaps:
            over = inputs.swap_tokens.flatten(0, 1)
            tokens = torch.where(
                (uniq >= len(table))[:, None],
                over[(uniq - len(table)).clamp(min=0, max=len(over) - 1)],
                tokens,
            )
        mask = tokens != table.pad_id  # (U, L)
        L = max(int(mask.sum(1).max()), 1)
        states = self.encoder.states(tokens[:, :L], inputs.embed, table.pad_id)  # (U, L, C)
        mask = mask[:, :L]
        if table.M:  # learnable slots read their own token states
            slot_states = self.encoder.implicit.states[uniq.clamp(max=table.M - 1)]  # (U, Li, C)
            is_slot = (uniq < table.M)[:, None]
            Lr = max(L, slot_states.shape[1])
            states = torch.where(
                is_slot[..., None],
                F.pad(slot_states, (0, 0, 0, Lr - slot_states.shape[1])),
                F.pad(states, (0, 0, 0, Lr - L)),
            )
            slot_mask = torch.arange(Lr, device=uniq.device) < slot_states.shape[1]
            mask = torch.where(is_slot, slot_mask, F.pad(mask, (0, Lr - L)))
            L = Lr
        kv = self.wkv(states.to(dtype))  # (U, L, 2C)
        if memo is not None:
            inputs.read_kv[self.layer_idx] = (memo, uniq, kv, mask)
        return kv, mask

    def _read(
        self, x: Tensor, rows: Tensor, weight: Tensor, inputs: ExplicitInputs, batch_row: Tensor
    ) -> Tensor:
        """Cross-attention of each token (n, C) to the token states of its ``rows`` (n, k), plus a null slot."""
        table, n, k = inputs.table, *rows.shape
        H, hd = self.n_head, self.head_dim
        # Which text each pick reads: the table row, or this sample's swapped copy of it (training).
        virtual = rows.clone()
        if inputs.swap_rows is not None and inputs.swap_rows.numel():
            S = inputs.swap_rows.shape[1]
            mine = inputs.swap_rows[batch_row]  # (n, S)
            hit = (rows[:, :, None] == mine[:, None, :]) & (rows[:, :, None] >= 0)  # (n, k, S)
            swapped = hit.any(-1)
            virtual = torch.where(swapped, len(table) + batch_row[:, None] * S + hit.float().argmax(-1), rows)
        uniq, inv = torch.unique(virtual.clamp(min=0), return_inverse=True)
        kv, mask = self._entry_kv(uniq, inputs, x.dtype)  # (U, L, 2C), (U, L)
        L = mask.shape[1]
        kv = kv[inv] * weight[:, :, None, None].to(kv.dtype)  # (n, k, L, 2C): straight-through weights
        mask = mask[inv] & (rows >= 0)[:, :, None]  # (n, k, L)
        kk, vv = kv.view(n, k * L, 2, H, hd).unbind(2)  # (n, kL, H, hd)
        kk = torch.cat([self.null_key.to(kk.dtype).expand(n, 1, H, hd), kk], 1).transpose(1, 2)
        vv = torch.cat([vv.new_zeros(n, 1, H, hd), vv], 1).transpose(1, 2)  # (n, H, 1 + kL, hd)
        mask = torch.cat([mask.new_ones(n, 1), mask.flatten(1)], 1)[:, None, None, :]  # (n, 1, 1, 1 + kL)
        qq = self.wq(x).view(n, H, 1, hd)
        y = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)  # (n, H, 1, hd)
        return self.wo(y.reshape(n, -1)) * torch.tanh(self.gate)

    def _aux_losses(self, memory, q, scores, cand, pick, cand_keys, gold, uniq, keys, table) -> None:
        """The paper's similarity and diversity losses, and the retrieval CE from the gold entry.

        q (n, d) queries; scores/cand (n, m) fine-stage logits and rows; pick (n, k); cand_keys (n, m, d);
        gold (n,) rows or None; uniq (U,) sorted rows whose fresh ``keys`` (U, d) were computed.
        """
        o, tag = self.o, f"explicitlm.{self.layer_idx}"
        if not len(q):  # every position retrieved by the question (query_encoder)
            return
        picked = scores.gather(1, pick[:, :1])
        ok = torch.isfinite(picked).squeeze(1)
        if o.similarity_weight > 0 and ok.any():  # the paper's: the query moves toward the key it chose
            sel = cand_keys.gather(1, pick[:, :1, None].expand(-1, 1, cand_keys.shape[-1])).squeeze(1)
            memory.aux_losses[f"{tag}.similarity"] = o.similarity_weight * (1 - (q * sel).sum(-1))[ok].mean()
        if o.diversity_weight > 0:  # the paper's: use every sub-key (balanced routing), through the query
            loss = 0.0
            for s in table.search.half_scores(q):
                p = (o.score_scale * s).softmax(-1).mean(0)
                loss = loss + (p * (p.clamp(min=1e-9) * p.shape[0]).log()).sum()
            memory.aux_losses[f"{tag}.diversity"] = o.diversity_weight * loss
        if gold is not None and o.retrieval_weight > 0 and (gold >= 0).any():
            # CE toward the gold entry among the coarse candidates (hard negatives) and the batch's other
            # gold entries (in-batch negatives), all scored with fresh keys.
            at = torch.nonzero(gold >= 0).flatten()
            uniq_g, own = torch.unique(gold[at], return_inverse=True)
            gk = keys[torch.searchsorted(uniq, uniq_g)]  # (G, d): every gold row is in uniq
            in_batch = o.score_scale * q[at] @ gk.T  # (n_g, G)
            hard = scores[at].masked_fill(torch.isin(cand[at], uniq_g), float("-inf"))  # (n_g, m)
            logits = torch.cat([in_batch, hard], 1)
            loss = F.cross_entropy(logits, own)
            if o.retrieval_negatives == "all":
                # And a softmax over every key as cached at the last refresh, the gold's included (trains the
                # query only): candidates and in-batch golds rarely include the person easiest to confuse.
                # Fresh golds against cached negatives would let the query follow the keys' drift since the
                # refresh instead of the person (measured: exact top-1 0.02 at step 1,000, against 0.33).
                cached = o.score_scale * q[at] @ table.search.keys.T.to(q.dtype)  # (n_g, R)
                loss = loss + F.cross_entropy(
                    cached.masked_fill(~table.search.alive, float("-inf")), gold[at]
                )
            memory.aux_losses[f"{tag}.retrieval"] = o.retrieval_weight * loss

    def _record(self, memory: MemoryContext, ids: Tensor) -> None:
        reads = memory.inputs.reads
        reads[self.layer_idx] = ids
        memory.retrieved_ids = torch.cat([reads[i] for i in sorted(reads)], dim=-1)


# ---- the design ---------------------------------------------------------------------------------------------
def memory_layers(config) -> list[int]:
    layers = config.memory_layers if config.memory_layers is not None else [config.n_layer // 2]
    bad = [i for i in layers if not 0 <= i < config.n_layer]
    if bad or not layers:
        raise ConfigError(f"model.memory_layers {layers} must name blocks in [0, {config.n_layer})")
    return sorted(set(layers))


@register_memory_design("explicitlm")
class ExplicitLM(MemoryDesign):
    options_class = ExplicitLMOptions
    uses_bank = True

    def shared_module(self, config) -> EntryEncoder:
        memory_layers(config)  # a bad layer list is a config error before anything is built
        self._encoder = EntryEncoder(n_embd=config.n_embd, o=self.options(config))
        return self._encoder

    def layer_hooks(self, config, layer_idx: int) -> LayerHooks:
        layers = memory_layers(config)
        if layer_idx not in layers:
            return LayerHooks()
        layer = ExplicitLMLayer(
            n_embd=config.n_embd, n_head=config.n_head, o=self.options(config), encoder=self._encoder,
            layer_idx=layer_idx, first=layer_idx == layers[0],
        )  # fmt: skip
        return LayerHooks(cross=layer)

    def reader(self, model, tokenizer, bank=None) -> ExplicitLMReader:
        return ExplicitLMReader(model, tokenizer, bank, self.options(model.config))


# ---- the reader: bank -> table, documents -> batches with gold entries and swaps ----------------------------
@dataclass
class _Fact:
    row: int
    subject: str | None
    relation: str | None
    object: str | None
    text: str
    content_hash: str


class ExplicitLMReader(MemoryReader):
    """Keeps the table in step with the bank (edit log) and with the model (keys re-encoded every
    ``refresh_every`` training steps), and lays out documents as ``BOS doc EOS`` with, per position, the gold
    entry whose object the next token spells (for the auxiliary loss) and per sample the swapped entries."""

    def __init__(self, model, tokenizer, bank, options: ExplicitLMOptions) -> None:
        super().__init__(model, tokenizer, bank)
        self.options = o = options
        self.namespaces = o.namespaces
        self.check_bank(self.namespaces)
        self.encoder: EntryEncoder = model.memory
        self.table = EntryTable(n_implicit=o.implicit_slots, o=o, pad_id=tokenizer.pad_id)
        self._row_of: dict[int, int] = {}  # bank id -> table row
        self._next_row = self.table.M  # rows are never reused: a deleted entry's row stays dead
        self._facts: dict[int, _Fact] = {}  # row -> triple, for gold labels and swaps
        self._by_subject: dict[str, list[int]] = {}  # subject -> rows
        self._max_words = 1
        # content hash -> (key, text) token ids, and the subject's tokens at the key's start (key: parts)
        self._tokens: dict[str, tuple[list[int], list[int], int]] = {}
        self._pools: dict[str, list[str]] | None = None
        self.bank_version = -1
        self.question = (
            QuestionReader(o.query_encoder, o.query_encoder_dim, tokenizer) if o.query_encoder else None
        )
        self._load(None)

    # ---- the table ---------------------------------------------------------------------------------------
    def _load(self, ids: Sequence[int] | None) -> int:
        """(Re)load entries ``ids`` (None: all) from the bank into the table; deleted ones become dead rows."""
        from memlm.bank.vectors import KEYS

        version = self.bank.version
        key = "about" if self.options.key == "parts" else self.options.key
        key_sql = KEYS[key]
        sql = (
            f"SELECT e.id, e.text, {key_sql}, e.content_hash, e.subject, e.relation, e.object FROM entries e"
        )
        where, args = [], []
        if self.namespaces is not None:
            where.append(f"e.namespace IN ({','.join('?' * len(self.namespaces))})")
            args += list(self.namespaces)
        found: list[tuple] = []
        con = self.bank.connection
        if ids is None:
            found = con.execute(
                sql + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY e.id", args
            ).fetchall()
        else:
            for c in range(0, len(ids), 900):
                part = list(ids[c : c + 900])
                w = [*where, f"e.id IN ({','.join('?' * len(part))})"]
                found += con.execute(sql + " WHERE " + " AND ".join(w), args + part).fetchall()
        present = {r[0] for r in found}
        gone = [i for i in (ids or []) if i not in present and i in self._row_of]
        todo = [r for r in found if r[3] not in self._tokens]
        if todo:
            o, tok = self.options, self.tokenizer
            # Key texts spelt as a question spells them (after a space), entry texts as the bank holds them.
            keys = tok.encode_batch([as_in_a_sentence(r[2]) for r in todo])
            texts = tok.encode_batch([r[1] for r in todo])
            for r, k, t in zip(todo, keys, texts):
                split = len(k[: o.key_tokens])  # key: about / text, or an entry with no triple
                if o.key == "parts" and r[4] is not None and r[5] is not None:
                    k, split = part_tokens(tok, r[4], r[5], o.key_tokens)
                self._tokens[r[3]] = (k[: o.key_tokens], t[: o.text_tokens], split)
        rows, bank_ids, alive = [], [], []
        for r in found:
            if r[0] not in self._row_of:
                self._row_of[r[0]], self._next_row = self._next_row, self._next_row + 1
            row = self._row_of[r[0]]
            self._unindex(row)
            self._facts[row] = _Fact(row, r[4], r[5], r[6], r[1], r[3])
            if r[4] is not None:
                self._by_subject.setdefault(r[4], []).append(row)
                self._max_words = max(self._max_words, len(r[4].split()))
            rows.append(row), bank_ids.append(r[0]), alive.append(True)
        for i in gone:  # deleted: the row is dead, its tokens zeroed, its cached token ids dropped
            row = self._row_of.pop(i)
            self._unindex(row)
            rows.append(row), bank_ids.append(-1), alive.append(False)
        if rows:
            pad = self.tokenizer.pad_id
            kt = [self._tokens[r[3]][0] for r in found] + [[] for _ in gone]
            tt = [self._tokens[r[3]][1] for r in found] + [[] for _ in gone]
            split = torch.tensor([self._tokens[r[3]][2] for r in found] + [0 for _ in gone])
            self.table.set_rows(
                torch.tensor(rows), torch.tensor(bank_ids),
                _pad(kt, self.options.key_tokens, pad), _pad(tt, self.options.text_tokens, pad), torch.tensor(alive),
                split,
            )  # fmt: skip
            if self.question is not None:  # the query encoder's vectors of the keys (dead rows: never found)
                ids_, texts = [r[0] for r in found], [r[2] for r in found]
                vecs = self.question.entry_vectors(self.bank, ids_, texts, key)
                self.table.set_text_keys(torch.tensor(rows[: len(found)], dtype=torch.long), vecs)
            if ids is not None:  # token ids of content no entry has any more (edited, deleted) are dropped
                keep = {f.content_hash for f in self._facts.values()}
                self._tokens = {h: v for h, v in self._tokens.items() if h in keep}
            if self.table.key_step is not None:  # keys exist: place the changed rows with current keys
                r = torch.tensor(rows, device=self.table.device)
                self.table.search.update(
                    r, self.table.encode_keys(self.encoder, self.model.wte, r), self.table.alive[r]
                )
        self._pools = None
        self.bank_version = version
        return len(rows)

    def _unindex(self, row: int) -> None:
        old = self._facts.pop(row, None)
        if old is not None and old.subject is not None:
            rows = self._by_subject[old.subject]
            rows.remove(row)
            if not rows:
                del self._by_subject[old.subject]

    def refresh(self) -> int:
        """Apply the bank's edits since the table was loaded; returns the number of entries re-derived."""
        if self.bank.version == self.bank_version:
            return 0
        return self._load(self.bank.changed_since(self.bank_version))

    def _maintain(self) -> None:
        """Before each batch: follow the bank's edits, and re-encode every key (refitting the sub-keys) when
        the model crossed a multiple of ``refresh_every`` training steps since the last time, or never did.
        (A run resumed from a checkpoint at such a multiple retraces the uninterrupted one exactly.)"""
        self.table.to(self.model.wte.weight.device)
        self.refresh()
        R, t = self.options.refresh_every, self.table
        if t.key_step is None or int(self.encoder.step) // R != t.key_step // R:
            self.refresh_keys()

    def refresh_keys(self) -> None:
        """Re-encode every key with the model's current weights and refit the sub-keys (call after changing
        the weights by hand; training and loading a checkpoint need no call)."""
        t, step = self.table, int(self.encoder.step)
        keys = t.encode_keys(self.encoder, self.model.wte)
        t.search.fit(keys, t.alive, seed=step)
        t.key_step = step

    def context(self, **extras) -> MemoryContext:
        return MemoryContext(inputs=ExplicitInputs(table=self.table, embed=self.model.wte, **extras))

    def _question(self, texts: Sequence[str], rows, T: int, *, left_pad: bool) -> dict[str, Tensor]:
        """query_encoder: each text's question embedding and the positions that have read it."""
        if self.question is None:
            return {}
        device = self.table.device
        return {
            "text": self.question.embed(texts).to(device),
            "text_mask": self.question.mask(texts, rows, T, left_pad=left_pad).to(device),
        }

    # ---- inference ---------------------------------------------------------------------------------------
    def prompts(self, prompts: Sequence[str]) -> PromptBatch:
        self._maintain()
        ids = self.tokenizer.encode_batch(list(prompts), bos=True)
        L = max((len(r) for r in ids), default=0)  # generation left-pads
        memory = self.context(**self._question(prompts, ids, L, left_pad=True))
        return PromptBatch(token_ids=ids, memory=memory, used=[[] for _ in ids], scores=[[] for _ in ids])

    # ---- training ----------------------------------------------------------------------------------------
    def train_batch(
        self, texts: Sequence[str], *, rng: random.Random | None = None, train: bool = True
    ) -> TrainBatch:
        self._maintain()
        o, tok = self.options, self.tokenizer
        swap = o.swap_prob if train and rng is not None else 0.0
        if swap > 0 and self._pools is None:
            from memlm.model.memory.rag import object_pools

            self._pools = object_pools(self.bank, self.namespaces)
        docs, swaps = [], []
        for text in texts:
            # the facts this sample states: a named subject's entries whose object the text contains
            facts = [self._facts[r] for s in self._subjects(text) for r in self._by_subject.get(s, [])]
            facts = [f for f in facts if f.object and f.object in text]
            new = [f.text for f in facts]
            if swap > 0 and facts:
                from memlm.model.memory.rag import swap_objects

                text, new = swap_objects(text, facts, rng, swap, self._pools)
            docs.append((text, facts, new))
            swaps.append([(f.row, t) for f, t in zip(facts, new) if t != f.text])
        encs = tok.backend.encode_batch([d[0] for d in docs], add_special_tokens=False)
        rows = [[tok.bos_id, *e.ids, tok.eos_id] for e in encs]
        golds = [
            _gold_positions(text, facts, new, enc.offsets) for (text, facts, new), enc in zip(docs, encs)
        ]
        noise = o.cue_noise if train and rng is not None else 0.0
        noised = []
        for b, ((text, facts, _), g) in enumerate(zip(docs, golds)):
            if noise > 0 and facts:  # position t's gold labels token t + 1
                first_object = min((pos + 1 for pos, _ in g), default=len(rows[b]))
                rows[b], where = self.cue_noise(text, rows[b], first_object, facts[0].subject, rng, noise)
                noised.append((b, where))
        batch = self.collate(rows, [1] * len(rows))
        B, T = batch.input_ids.shape
        self.ignore_noised(batch.targets, noised)
        gold = torch.full((B, T), -1, dtype=torch.long)
        for b, g in enumerate(golds):
            for pos, row in g:
                if pos < T:
                    gold[b, pos] = row
        valid = torch.zeros(B, T, dtype=torch.bool)
        for b, r in enumerate(rows):
            valid[b, : min(len(r) - 1, T)] = True
        S = max((len(s) for s in swaps), default=0)
        swap_rows = torch.full((B, S), -1, dtype=torch.long)
        swap_tokens = torch.full((B, S, o.text_tokens), tok.pad_id, dtype=torch.long)
        if S:
            flat = tok.encode_batch([t for s in swaps for _, t in s])
            i = 0
            for b, s in enumerate(swaps):
                for j, (row, _) in enumerate(s):
                    swap_rows[b, j] = row
                    ids = flat[i][: o.text_tokens]
                    swap_tokens[b, j, : len(ids)] = torch.tensor(ids)
                    i += 1
        batch.memory = self.context(
            gold=gold, valid=valid, swap_rows=swap_rows, swap_tokens=swap_tokens,
            **self._question([d[0] for d in docs], rows, T, left_pad=False),
        )  # fmt: skip
        batch.used = [sorted({int(self.table.ids[f.row]) for f in d[1]}) for d in docs]
        return batch

    def _subjects(self, text: str) -> list[str]:
        """Bank subjects named in ``text`` (word n-grams looked up, trailing punctuation tried off and on)."""
        words = list(re.finditer(r"\S+", text))
        found: dict[str, None] = {}
        for i in range(len(words)):
            for n in range(1, min(self._max_words, len(words) - i) + 1):
                span = text[words[i].start() : words[i + n - 1].end()]
                for cand in (span, span.rstrip(".,;:!?\"')")):
                    if cand in self._by_subject:
                        found[cand] = None
        return list(found)


def _gold_positions(
    text: str, facts: Sequence[_Fact], new_texts: Sequence[str], offsets
) -> list[tuple[int, int]]:
    """(row position, table row) for every token of ``text`` that spells a fact's object.

    Token j of the document sits at row position j + 1 (after BOS) and is predicted at position j. An object
    string shared by two facts of the sample is ambiguous and labels nothing.
    """
    objects: dict[str, list[int]] = {}
    for f, new in zip(facts, new_texts):
        obj = f.object
        if obj and new != f.text:  # swapped: find the new value (the entry text changed exactly there)
            obj = _swapped_object(f.text, new, obj)
        if obj:
            objects.setdefault(obj, []).append(f.row)
    out = []
    for obj, rows in objects.items():
        if len(rows) != 1:
            continue
        for m in re.finditer(r"(?<!\w)" + re.escape(obj) + r"(?!\w)", text):
            s, e = m.span()
            for j, (a, b) in enumerate(offsets):
                if a < e and b > s and text[max(a, s) : min(b, e)].strip():
                    out.append((j, rows[0]))
    return out


def _swapped_object(old_text: str, new_text: str, old_obj: str) -> str | None:
    i = old_text.find(old_obj)
    if i < 0:
        return None
    tail = len(old_text) - (i + len(old_obj))
    return new_text[i : len(new_text) - tail] if tail else new_text[i:]


def _pad(seqs: Sequence[Sequence[int]], length: int, pad: int) -> Tensor:
    out = torch.full((len(seqs), length), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s)[:length], dtype=torch.long)
    return out
