"""PlugLM: a differentiable plug-in memory (DPM) read by knowledge attention in place of the FFN.

Paper: Cheng et al., "Decouple knowledge from parameters for plug-and-play language modeling" (2023,
arXiv 2305.11564). Every bank entry becomes a key (``key_dim``, paper 128) and a value (model width) made by a
knowledge encoder from the model's own token embeddings with attentive pooling. In the memory layers the FFN is
replaced (``replace_ffn``) or joined by *knowledge attention*: the position's query finds the top-N entries by
maximum inner product over every key, the retrieved entries are re-encoded with gradient, and the position
attends over their values with a per-head bias ``beta_h * cos(q, k)`` from the query-key similarity.

What memlm does differently:

- **Causal.** The paper's BERT pools its query over the whole sequence; here the query at position ``t`` is a
  projection of the hidden state at ``t``, so it depends only on tokens ``<= t`` (``tests/test_pluglm.py``).
  No BatchNorm on the query (the paper's): batch statistics would mix positions, future ones included.
- **Keys from what an entry is about.** ``key: about`` (default) encodes "subject relation" of a triple, the
  value encodes the entry's whole text: a question names its subject and relation, never its answer.
- **Values the model can decode.** ``value: vector`` is the paper's one pooled vector per entry. ``value:
  tokens`` keeps one value per entry *token* (its embedding, keyed by itself and its predecessor), so the layer
  can copy a multi-token answer ("17 July 1976") token by token, the way an induction head does.
- **Plug and play, scoped.** The reader (:mod:`memlm.model.memory.pluglm_reader`) builds the key table from the
  bank's entries in the reader's namespaces only, follows the bank's edits, and refreshes every key from the
  current encoder every ``refresh_every`` training steps (stale keys in between, as in the paper).
- **A pretrained reader of the question, optional.** The paper's query comes from a pretrained BERT that knows
  English; a backbone trained from scratch on one corpus knows only the corpus's words, and misses questions
  phrased with words it never saw (bios, held-out phrasings: docs/results_pluglm.md). ``query_encoder`` (a
  :mod:`memlm.encode` spec, e.g. ``minilm``) adds a learnt projection of that encoder's embedding of the text's
  first sentence or line (a prompt's question) to the query of every position after it; earlier positions
  never see it (causal). Off by default: the paper's query. ``query_route: search`` goes further: positions
  that have read the text retrieve by it, with that encoder's vectors of the entries' keys (RAG's search, over
  the same table, namespaces and edits), and the ``beta_h * cos`` bias takes that similarity; the learnt query
  retrieves at every other position. A question in words the corpus never used then reaches the right entry
  as often as RAG's does, and what the layer adds is PlugLM's own: reading the entry inside the FFN.
- An auxiliary retrieval loss teaches the query where the data knows the gold entry (the entry whose object
  the position is about to predict): cross-entropy of the gold key against the retrieved ones (``aux_weight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.errors import ConfigError
from memlm.model.memory.base import LayerHooks, MemoryContext, MemoryDesign
from memlm.model.memory.parts import join_halves, key_halves
from memlm.model.memory.question import read_mask
from memlm.model.memory.registry import register_memory_design

if TYPE_CHECKING:
    from memlm.model.config import ModelConfig


@dataclass
class PlugLMOptions:
    key_dim: int = 128  # paper: 128-d keys; the MIPS table is (entries, key_dim)
    top_n: int = 5  # paper: top-5 entries per position
    read_top_n: int | None = None  # inference reads this many (None: top_n); training always reads top_n
    key: str = "about"  # what a key encodes: about (subject + relation of a triple) | text (the whole entry)
    # | parts: subject and relation pooled apart, each half of the key (and of the query): a person's six
    # keys then differ by a whole half, not by the one or two relation tokens inside one pooled vector
    value: str = "vector"  # vector: one pooled vector per entry (paper) | tokens: one value per entry token
    encoder: str = "shared"  # shared: the LM's own token embeddings (paper) | own: a separate embedding table
    # the keys' search (and query_route search's): exact (torch matmul) | faiss (memlm's FAISS index: flat below
    # 50,000 entries, IVF from there on) | auto: exact below 50,000 entries, faiss from there on (row_index.py)
    index: str = "auto"
    refresh_every: int = 200  # training steps between full key-table refreshes (paper: ~200); stale between
    replace_ffn: bool = True  # True: memory layers have no FFN (paper); False: the memory joins the FFN
    aux_weight: float = 0.5  # weight of the gold-entry retrieval loss (0: off)
    temperature: float = 0.1  # cosine -> logits of the retrieval loss
    beta_init: float = 5.0  # initial per-head weight of the cos(q, k) bias in knowledge attention
    retrieval_negatives: str = "retrieved"  # retrieved: the top-N | all: every key of the table as well
    teacher_forcing: float = 0.0  # training: share of gold positions whose missed gold takes the last slot
    swap_prob: float = 0.5  # training: share of a sample's triples whose object is swapped (entry and text)
    # training: share of the words before a text's first object (in its first sentence or line, not its
    # subject's name) replaced by random tokens: the query learns to use whichever cue words remain, as a
    # question phrased in words the corpus never used leaves it (docs/results_pluglm.md)
    cue_noise: float = 0.0
    namespaces: list[str] | None = None  # retrieval scope; None: every namespace of the bank
    entry_tokens: int = 32  # an entry's text (or about-text) is cut to this many tokens
    query_encoder: str | None = None  # a memlm.encode spec (minilm): its embedding of the first sentence or
    # line joins the query of the positions after it; None: the query is the hidden state's alone (paper)
    query_encoder_dim: int = 384  # that encoder's output width (minilm: 384)
    # add: a learnt projection of the text's embedding joins the learnt query | search: positions that have
    # read the text retrieve by it, as RAG does (that encoder's embedding against the same encoder's vectors of
    # the entries' keys); the learnt query retrieves everywhere else
    query_route: str = "add"

    def __post_init__(self) -> None:
        choices = {"key": ("about", "text", "parts"), "value": ("vector", "tokens"), "encoder": ("shared", "own"),
                   "index": ("auto", "exact", "faiss"), "retrieval_negatives": ("retrieved", "all"),
                   "query_route": ("add", "search")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"model.memory_options.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        for name in ("key_dim", "top_n", "refresh_every", "entry_tokens", "query_encoder_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.memory_options.{name} must be >= 1, got {getattr(self, name)}")
        if self.read_top_n is not None and self.read_top_n < 1:
            raise ConfigError(f"model.memory_options.read_top_n must be >= 1 or null, got {self.read_top_n}")
        for name in ("swap_prob", "teacher_forcing", "cue_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"model.memory_options.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.query_route == "search" and self.query_encoder is None:
            raise ConfigError("model.memory_options.query_route: search needs a query_encoder (e.g. minilm)")
        if self.query_encoder is not None and self.key == "parts":
            raise ConfigError("model.memory_options.query_encoder works with key: about or text, not parts")
        if self.aux_weight < 0 or self.temperature <= 0:
            raise ConfigError("model.memory_options.aux_weight must be >= 0 and temperature > 0")


@dataclass
class PlugInputs:
    """What the reader hands the memory layers for one forward call (``MemoryContext.inputs``).

    ``table`` is the reader's :class:`~memlm.model.memory.pluglm_reader.KeyTable` (every entry in scope: bank
    ids, token ids, the possibly stale key matrix, its index). Training adds ``gold`` and ``overrides``.
    """

    table: object
    gold: Tensor | None = None  # (B, T) table row of the entry whose object position t predicts; -1: none
    override_rows: Tensor | None = None  # (B, J) table rows whose value this sample reads from other tokens
    override_tokens: Tensor | None = None  # (B, J, L) those tokens (swapped objects); PAD-padded
    text: Tensor | None = None  # (B, E) query_encoder's embedding of each row's first sentence or line
    text_mask: Tensor | None = None  # (B, T) positions that have read all of it (aligned like the input ids)
    # query_route: search — n -> (B, n) the text's top rows, searched once per batch (not per decoding step)
    text_hits: dict[int, Tensor] = field(default_factory=dict)

    def search_text(self, n: int) -> Tensor:
        if n not in self.text_hits:
            self.text_hits[n] = self.table.search_text(self.text, n)
        return self.text_hits[n]

    def to(self, device: torch.device) -> PlugInputs:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        self.table.to(device)
        return PlugInputs(
            self.table, move(self.gold), move(self.override_rows), move(self.override_tokens), move(self.text),
            move(self.text_mask),
        )  # fmt: skip


class AttentivePool(nn.Module):
    """(N, L, C) token features + (N, L) mask -> (N, C): a softmax-weighted sum (the paper's KnowEncoder).

    One linear score per token: the paper's tanh-MLP scorer cost an (entries x tokens x C x C) product on
    every re-encoded entry, the bulk of a training step at this scale."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.score = nn.Linear(n_embd, 1, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        w = self.score(x).squeeze(-1).masked_fill(~mask, float("-inf"))  # (N, L)
        w = torch.nan_to_num(w.softmax(-1))  # an empty entry (no tokens) pools to zero
        return torch.einsum("nl,nlc->nc", w, x)


class KnowledgeEncoder(nn.Module):
    """Entry token ids -> keys (unit vectors, ``key_dim``) and values (model width), shared by every memory
    layer. ``encoder: shared`` reads the LM's token embedding through a plain reference set by :meth:`bind`
    (never a second registration: safetensors refuses tensors saved under two names)."""

    def __init__(
        self, *, vocab_size: int, n_embd: int, key_dim: int, own_embedding: bool, max_len: int,
        parts: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab_size, n_embd) if own_embedding else None
        # LayerNorms put pooled embeddings (std ~0.02) at unit scale: unit keys then have a well-conditioned
        # gradient (normalising a tiny vector multiplies its gradient by 1 / its norm).
        self.key_pool = AttentivePool(n_embd)
        self.key_proj = nn.Sequential(
            nn.LayerNorm(n_embd), nn.Linear(n_embd, key_halves(key_dim)[0] if parts else key_dim)
        )
        if parts:  # key: parts — the relation's own pool and half (memlm/model/memory/parts.py)
            self.relation_pool = AttentivePool(n_embd)
            self.relation_proj = nn.Sequential(
                nn.LayerNorm(n_embd), nn.Linear(n_embd, key_halves(key_dim)[1])
            )
        self.value_pool = AttentivePool(n_embd)
        self.value_proj = nn.Sequential(nn.LayerNorm(n_embd), nn.Linear(n_embd, n_embd))
        self.value_pos = nn.Embedding(max_len, n_embd)  # order inside an entry (tokens values)
        self.prev = nn.Linear(n_embd, n_embd, bias=False)  # a value token's key also sees its predecessor
        self.token_norm = nn.LayerNorm(n_embd)  # tokens values: unit-scale features of the vocabulary
        self._shared: list[nn.Embedding] = []  # the LM's embedding, held outside the module tree
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def bind(self, embedding: nn.Embedding) -> None:
        self._shared = [embedding]

    def embedding(self, tokens: Tensor) -> Tensor:
        table = self.embed if self.embed is not None else self._shared[0]
        return table(tokens)

    def keys(self, tokens: Tensor, lengths: Tensor, split: Tensor | None = None) -> Tensor:
        """tokens (N, L), lengths (N,) -> unit keys (N, key_dim).

        ``split`` (N,) (``key: parts``): the first ``split`` tokens are the subject, the rest the relation; each
        is pooled and normalised on its own, and the key is both halves over sqrt(2). An entry without a
        relation (a text entry: split == length) pools its whole text into both halves."""
        mask, x = _mask(tokens, lengths), self.embedding(tokens)
        if split is None:
            return F.normalize(self.key_proj(self.key_pool(x, mask)), dim=-1)
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
        whole = (split == lengths)[:, None]  # no relation: both halves pool the whole text
        subject = mask & ((pos < split[:, None]) | whole)
        relation = mask & ((pos >= split[:, None]) | whole)
        return join_halves(
            self.key_proj(self.key_pool(x, subject)), self.relation_proj(self.relation_pool(x, relation))
        )

    def values(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """tokens (N, L) -> one value per entry (N, C) (the paper's pooled value)."""
        mask = _mask(tokens, lengths)
        return self.value_proj(self.value_pool(self.embedding(tokens), mask))

    def vocab_features(self) -> tuple[Tensor, Tensor]:
        """Per vocabulary id: (own feature (V, C), feature as a predecessor (V, C)) for ``value: tokens``.

        Computed over the vocabulary, not over every retrieved token: a value token's key is then a sum of
        gathered rows (own + predecessor + position), so its cost does not grow with the entries read."""
        table = self.embed if self.embed is not None else self._shared[0]
        own = self.token_norm(table.weight)
        return own, self.prev(own)


def _mask(tokens: Tensor, lengths: Tensor) -> Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]


class KnowledgeAttention(nn.Module):
    """The memory layer (``ffn_branch``): h (B, T, C) -> (B, T, C) read from the top-N entries.

    Retrieval is exact over the reader's key table (stale between refreshes); scoring and reading use keys and
    values re-encoded with gradient, so the encoder, the query and the reading all train end to end."""

    def __init__(
        self, *, n_embd: int, n_head: int, key_dim: int, top_n: int, value: str, beta_init: float,
        temperature: float, aux_weight: float, encoder: KnowledgeEncoder, teacher_forcing: float = 0.0,
        retrieval_negatives: str = "retrieved", read_top_n: int | None = None, parts: bool = False,
        text_dim: int | None = None, text_search: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.text_search = text_search  # query_route: search (text_dim then adds no learnt term)
        self.n_head, self.top_n, self.value, self.teacher_forcing = n_head, top_n, value, teacher_forcing
        self.read_top_n = read_top_n
        self.retrieval_negatives = retrieval_negatives
        self.temperature, self.aux_weight = temperature, aux_weight
        # The retrieval query, from the position's own hidden state (key: parts — one head per half).
        self.query = nn.Linear(n_embd, key_halves(key_dim)[0] if parts else key_dim)
        self.relation_query = nn.Linear(n_embd, key_halves(key_dim)[1]) if parts else None
        # query_encoder: zero-initialised, so training starts from the hidden state's query alone
        learnt = text_dim is not None and not text_search
        self.text_query = nn.Linear(text_dim, key_dim, bias=False) if learnt else None
        if self.text_query is not None:
            nn.init.zeros_(self.text_query.weight)
        self.wq = nn.Linear(n_embd, n_embd, bias=False)
        self.wk = nn.Linear(n_embd, n_embd, bias=False)
        self.wv = nn.Linear(n_embd, n_embd, bias=False)
        self.wo = nn.Linear(n_embd, n_embd, bias=False)
        self.beta = nn.Parameter(torch.full((n_head,), float(beta_init)))
        nn.init.normal_(self.wo.weight, std=0.02 / math.sqrt(2))  # the rest: PyTorch's default init
        self._encoder = [encoder]  # shared module: a plain reference, not a submodule

    @property
    def encoder(self) -> KnowledgeEncoder:
        return self._encoder[0]

    def forward(self, h: Tensor, memory: MemoryContext | None) -> Tensor:
        inputs = memory.inputs if memory is not None else None
        if not isinstance(inputs, PlugInputs) or len(inputs.table) == 0:
            return torch.zeros_like(h)  # no memory: the layer adds nothing
        table = inputs.table
        B, T, C = h.shape
        # Training reads top_n (more chances to read the gold while the query is poor); inference may read
        # fewer: given several entries of one person the reading often copies the wrong one
        # (docs/results_pluglm.md: top 5 -> 1 at inference, EM 0.308 -> 0.407 on people plugged in later).
        n = self.top_n if self.training or self.read_top_n is None else self.read_top_n
        N = min(n, len(table))
        q = self.retrieval_query(h, self._text_term(inputs, T))  # (B, T, dk): from tokens <= t only
        flat_q = q.detach().reshape(B * T, -1)  # the search uses stale keys: no gradient
        read, gold = None, inputs.gold  # read (B, T): the positions that retrieve by the text
        if self.text_search:
            read = read_mask(inputs.text, inputs.text_mask, T, "PlugLM")
            rows = inputs.search_text(N)[:, None, :].expand(B, T, N).clone()
            # only the positions that have not read the text search by the learnt query (decoding: none)
            learnt = ~read.reshape(-1)
            if learnt.any():
                rows.view(B * T, N)[learnt] = table.search(flat_q[learnt], N)
            gold = None if gold is None else gold.masked_fill(read, -1)  # nothing to teach the learnt query
        else:
            rows = table.search(flat_q, N).view(B, T, N)
        if self.training and self.teacher_forcing > 0 and inputs.gold is not None:
            # Teacher forcing: where the search missed the gold entry, it takes the last slot, so reading is
            # learnt while retrieval is still poor (an 800-step run found the gold half the time and read
            # nothing from it, docs/results_pluglm.md). Inference never sees a gold.
            g = inputs.gold
            force = (
                (g >= 0)
                & ~(rows == g[..., None]).any(-1)
                & (torch.rand(g.shape, device=g.device) < self.teacher_forcing)
            )
            rows = torch.cat([rows[..., :-1], torch.where(force, g, rows[..., -1])[..., None]], -1)

        # Re-encode the retrieved (and gold) entries with gradient, once each.
        gold = gold if self.training and self.aux_weight > 0 else None
        wanted = rows.reshape(-1) if gold is None else torch.cat([rows.reshape(-1), gold[gold >= 0]])
        uniq, inv = torch.unique(wanted, return_inverse=True)
        if self.training:  # re-encoded with gradient (the paper); inference reads the table's fresh keys
            split = None if table.key_split is None else table.key_split[uniq]
            keys = self.encoder.keys(table.key_tokens[uniq], table.key_len[uniq], split)  # (U, dk)
        else:
            keys = table.keys[uniq]
        slot = inv[: B * T * N].view(B, T, N)  # value slot of each retrieved entry
        vtok, vlen = table.value_tokens[uniq], table.value_len[uniq]
        if inputs.override_rows is not None:  # swapped objects: this sample reads other value tokens
            J = inputs.override_rows.shape[1]
            ov = inputs.override_tokens.flatten(0, 1)
            vlen = torch.cat([vlen, (ov != table.pad_id).sum(-1)])
            vtok = _cat_padded(vtok, ov, table.pad_id)
            hit = rows[..., None] == inputs.override_rows[:, None, None, :]  # (B, T, N, J)
            j = hit.float().argmax(-1)
            own = len(uniq) + torch.arange(B, device=h.device)[:, None, None] * J + j
            slot = torch.where(hit.any(-1), own, slot)
        s = torch.einsum("btk,btnk->btn", q, keys[inv[: B * T * N]].view(B, T, N, -1))  # (B, T, N) cosine
        if read is not None:  # where the text retrieved, its similarity is the bias (fixed: nothing to learn)
            s_text = torch.einsum("be,btne->btn", inputs.text.to(s.dtype), table.text_keys[rows].to(s.dtype))
            s = torch.where(read[..., None], s_text, s)

        H, d = self.n_head, C // self.n_head
        qh = self.wq(h).view(B, T, H, d)
        bias = self.beta.view(1, 1, H, 1) * s[:, :, None, :]  # (B, T, H, N): paper's beta_h * cos(q, k)
        if self.value == "vector":
            v = self.encoder.values(vtok, vlen)  # (U', C)
            kh, vh = self.wk(v).view(-1, H, d)[slot], self.wv(v).view(-1, H, d)[slot]  # (B, T, N, H, d)
            att = torch.einsum("bthd,btnhd->bthn", qh, kh) / math.sqrt(d) + bias
            out = torch.einsum("bthn,btnhd->bthd", att.softmax(-1), vh)
        else:
            # One value per entry token: its key holds the token, its predecessor and its position, so the
            # query of a position that has just produced "17 July" finds "1976" (copying, token by token).
            # Scores are taken against the whole vocabulary (one matmul) and gathered at the entries' token
            # ids; the read is scattered back to vocabulary space: no (B, T, N, L, C) tensor is ever built.
            k_own, k_prev, v_own = self._vocab_tables(H, d)  # (V, H, d) each
            V = k_own.shape[0]
            ids = vtok[slot].flatten(-2)  # (B, T, N*L) token ids of the retrieved entries
            L = vtok.shape[1]
            mask = (torch.arange(L, device=h.device) < vlen[slot][..., None]).flatten(-2)  # (B, T, N*L)
            before = F.pad(vtok, (1, 0), value=table.pad_id)[:, :-1][slot].flatten(-2)  # predecessors
            qs = qh / math.sqrt(d)
            s_pos = torch.einsum(
                "bthd,lhd->bthl", qs, self.wk(self.encoder.value_pos.weight[:L]).view(L, H, d)
            )
            # Without gradient, when the read tokens' keys (N*L x C per position) are no bigger than the
            # vocabulary-wide scores (H x V; decoding reads one entry of ~12 tokens), they and their values are
            # gathered instead: the same sums, a fraction of the work (the vocabulary-wide products were most
            # of a decode step's memory layer).
            gather = not torch.is_grad_enabled() and N * L * C <= H * V
            if gather:
                kk = k_own[ids] + k_prev[before]  # (B, T, N*L, H, d)
                att = torch.einsum("bthd,btjhd->bthj", qs, kk) + s_pos.repeat(1, 1, 1, N)
            else:
                s_own = torch.einsum("bthd,vhd->bthv", qs, k_own)  # (B, T, H, V)
                s_prev = torch.einsum("bthd,vhd->bthv", qs, k_prev)
                idx, idx_before = (x[:, :, None].expand(B, T, H, N * L) for x in (ids, before))
                att = s_own.gather(-1, idx) + s_prev.gather(-1, idx_before) + s_pos.repeat(1, 1, 1, N)
            att = att + bias.repeat_interleave(L, dim=-1)  # (B, T, H, N*L)
            w = torch.nan_to_num(att.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1))
            if gather:
                out = torch.einsum("bthj,btjhd->bthd", w, v_own[ids])
            else:
                w_vocab = torch.zeros(B, T, H, V, dtype=w.dtype, device=h.device).scatter_add(-1, idx, w)
                out = torch.einsum("bthv,vhd->bthd", w_vocab, v_own)
        y = self.wo(out.reshape(B, T, C))

        memory.retrieved_ids = table.ids[rows]  # (B, T, N) bank ids, best first
        memory.retrieved_scores = s.detach()
        if gold is not None and bool((gold >= 0).any()):
            memory.add_loss(
                "pluglm_retrieval", self.aux_weight * self._retrieval_loss(q, rows, keys, inv, gold, table)
            )
        return y

    def retrieval_query(self, h: Tensor, text: Tensor | None = None) -> Tensor:
        """Unit queries (..., key_dim) from hidden states (..., C) (``key: parts``: two unit halves), plus
        ``text`` (..., key_dim), the query encoder's term, where given."""
        q = self.query(h) if text is None else self.query(h) + text
        if self.relation_query is None:
            return F.normalize(q, dim=-1)
        return join_halves(q, self.relation_query(h))

    def _text_term(self, inputs: PlugInputs, T: int) -> Tensor | None:
        """(B, T, key_dim): the projected text embedding at positions that have read the whole text, else 0."""
        if self.text_query is None:
            return None
        mask = read_mask(inputs.text, inputs.text_mask, T, "PlugLM").to(inputs.text.dtype)
        return self.text_query(inputs.text)[:, None, :] * mask[..., None]

    def _vocab_tables(self, H: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per vocabulary id: key as a token, key as a predecessor, value; each (V, H, d).

        Without gradient they are cached until a weight they depend on changes (a parameter's ``_version``
        moves with every in-place update): decoding would otherwise redo three (V x C x C) products per token."""
        enc = self.encoder
        table = enc.embed if enc.embed is not None else enc._shared[0]
        params = (table.weight, enc.token_norm.weight, enc.token_norm.bias, enc.prev.weight, self.wk.weight,
                  self.wv.weight)  # fmt: skip
        stamp = tuple((p.data_ptr(), p._version) for p in params)  # moved or updated: recompute
        if torch.is_grad_enabled() or getattr(self, "_vocab_stamp", None) != stamp:
            own, prev = enc.vocab_features()
            V = own.shape[0]
            tables = (self.wk(own).view(V, H, d), self.wk(prev).view(V, H, d), self.wv(own).view(V, H, d))
            if torch.is_grad_enabled():
                return tables
            self._vocab_cache, self._vocab_stamp = tables, stamp
        return self._vocab_cache

    def _retrieval_loss(
        self, q: Tensor, rows: Tensor, keys: Tensor, inv: Tensor, gold: Tensor, table
    ) -> Tensor:
        """Cross-entropy of the gold entry's (fresh) key against the retrieved ones, at positions with a gold
        (``retrieval_negatives: all``: plus one over every key of the table as of its last refresh)."""
        B, T, N = rows.shape
        at = gold >= 0  # (B, T)
        kg = keys[inv[B * T * N :]]  # (P, dk): gold keys, in the order of gold[at]
        kr = keys[inv[: B * T * N].view(B, T, N)[at]]  # (P, N, dk)
        qa = q[at]  # (P, dk)
        logits = torch.cat([(qa * kg).sum(-1, keepdim=True), torch.einsum("pk,pnk->pn", qa, kr)], -1)
        logits[:, 1:] = logits[:, 1:].masked_fill(rows[at] == gold[at][:, None], float("-inf"))
        target = torch.zeros(len(qa), dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits / self.temperature, target)
        if self.retrieval_negatives == "all":
            # A softmax over every key of the table as of its last refresh, the gold's included (trains the
            # query only; fresh golds against stale negatives would reward following the keys' drift).
            loss = loss + F.cross_entropy(qa @ table.keys.T.to(qa.dtype) / self.temperature, gold[at])
        return loss


def _cat_padded(a: Tensor, b: Tensor, pad: int) -> Tensor:
    """(N, La), (M, Lb) token rows -> (N + M, max(La, Lb)), PAD-padded."""
    L = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(a, (0, L - a.shape[1]), value=pad), F.pad(b, (0, L - b.shape[1]), value=pad)])


@register_memory_design("pluglm")
class PlugLM(MemoryDesign):
    options_class = PlugLMOptions
    uses_bank = True

    def __init__(self) -> None:
        self._encoder: KnowledgeEncoder | None = None

    def shared_module(self, config: ModelConfig) -> KnowledgeEncoder:
        o = self.options(config)
        self._encoder = KnowledgeEncoder(
            vocab_size=config.vocab_size, n_embd=config.n_embd, key_dim=o.key_dim,
            own_embedding=o.encoder == "own", max_len=o.entry_tokens, parts=o.key == "parts",
        )  # fmt: skip
        return self._encoder

    def layers(self, config: ModelConfig) -> list[int]:
        """Memory layers: ``model.memory_layers``, or the last block (at 4 x 128 it beat the one before last in
        EM and edits, reading the top 1 or 5: docs/results_pluglm.md)."""
        layers = config.memory_layers if config.memory_layers is not None else [config.n_layer - 1]
        bad = [i for i in layers if not 0 <= i < config.n_layer]
        if bad:
            raise ConfigError(f"model.memory_layers {bad} out of range for n_layer={config.n_layer}")
        return layers

    def layer_hooks(self, config: ModelConfig, layer_idx: int) -> LayerHooks:
        if layer_idx not in self.layers(config):
            return LayerHooks()
        if self._encoder is None:
            self.shared_module(config)
        o = self.options(config)
        branch = KnowledgeAttention(
            n_embd=config.n_embd, n_head=config.n_head, key_dim=o.key_dim, top_n=o.top_n, value=o.value,
            beta_init=o.beta_init, temperature=o.temperature, aux_weight=o.aux_weight, encoder=self._encoder,
            teacher_forcing=o.teacher_forcing, retrieval_negatives=o.retrieval_negatives, read_top_n=o.read_top_n,
            parts=o.key == "parts", text_dim=o.query_encoder_dim if o.query_encoder else None,
            text_search=bool(o.query_encoder) and o.query_route == "search",
        )  # fmt: skip
        return LayerHooks(ffn_branch=branch, replace_ffn=o.replace_ffn)

    def bind(self, model: nn.Module) -> None:
        model.memory.bind(model.wte)

    def reader(self, model, tokenizer, bank=None):
        from memlm.model.memory.pluglm_reader import PlugLMReader

        return PlugLMReader(model, tokenizer, bank, self.options(model.config))
