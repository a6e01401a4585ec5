"""PlugLM's reader: the key table over the bank, its refreshes, and training samples with gold entries.

The :class:`KeyTable` holds every entry in the reader's namespaces: bank ids, the token ids its keys and values
are encoded from (cached by content hash and tokenizer fingerprint, so an edit re-tokenises one entry and a
deleted entry leaves nothing behind), and the key matrix the memory layers search by maximum inner product
(:class:`~memlm.model.memory.row_index.RowIndex`: exact torch top-N, or memlm's FAISS index, flat (the same
top-N on the same keys, ``tests/test_pluglm.py``) below 50,000 entries and IVF from there on).

Keys are refreshed from the current knowledge encoder every ``refresh_every`` training steps (stale in between,
as in the paper; ``version`` counts refreshes) and whenever the bank changes. Plugging knowledge in or out is a
bank edit: import a namespace (or delete it) and the next prompt reads the new table, with no training.

Training samples: the reader finds the document's subject among the bank's subjects, swaps the object of some
of its triples (``swap_prob``: in the document and in the value the model reads alike, so the fact is only in
the bank), and marks each position whose next token belongs to an object with that entry's table row (the gold
of the retrieval loss). Every token after BOS is a target: retrieval is per position, from the prefix.

With ``query_encoder`` (:mod:`memlm.model.memory.question`), each text's first sentence or line is embedded
after the swaps, and the positions that have read it are marked. ``query_route: search`` also gives the table
that encoder's vectors of the entries' keys, rebuilt with the table whenever the bank changes.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from memlm.model.memory.base import MemoryContext
from memlm.model.memory.parts import part_tokens
from memlm.model.memory.pluglm import PlugInputs, PlugLMOptions
from memlm.model.memory.question import QuestionReader, key_text
from memlm.model.memory.reader import MemoryReader, PromptBatch, TrainBatch, as_in_a_sentence
from memlm.model.memory.row_index import RowIndex


class KeyTable:
    """Every entry in scope: ids (M,), key/value token ids (M, L) PAD-padded with lengths, keys (M, key_dim);
    with ``query_route: search`` also ``text_keys`` (M, E), the query encoder's vectors of the same keys. Both
    are searched through a :class:`RowIndex` (``index``: exact torch, or memlm's FAISS index at scale)."""

    def __init__(
        self, *, ids: Tensor, key_tokens: Tensor, key_len: Tensor, value_tokens: Tensor, value_len: Tensor,
        pad_id: int, key_dim: int, index: str = "exact", key_split: Tensor | None = None,
    ) -> None:  # fmt: skip
        self.ids, self.pad_id, self.index = ids, pad_id, index
        self.key_tokens, self.key_len = key_tokens, key_len
        self.key_split = key_split  # (M,) subject tokens before the relation's (key: parts); None: one pool
        self.value_tokens, self.value_len = value_tokens, value_len
        self.key_index = RowIndex(key_dim, index="exact", device=ids.device)  # zeros until the first refresh
        self.key_index.set(torch.arange(len(ids)), torch.zeros(len(ids), key_dim))
        self.version = 0  # full key refreshes so far
        self.text: RowIndex | None = None  # query_route search: the query encoder's vectors and their search

    _TENSORS = ("ids", "key_tokens", "key_len", "value_tokens", "value_len", "key_split")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def keys(self) -> Tensor:
        """(M, key_dim) the keys of the current version (stale between refreshes in training)."""
        return self.key_index.vectors

    def to(self, device: torch.device) -> KeyTable:
        for name in self._TENSORS:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        for index in (self.key_index, self.text):
            if index is not None:
                index.to(device)
        return self

    def set_keys(self, keys: Tensor) -> None:
        """Install a full key matrix (M, key_dim): a new version, its index built anew (IVF centroids follow)."""
        self.key_index = RowIndex(keys.shape[1], index=self.index, device=self.ids.device)
        self.key_index.set(torch.arange(len(self)), keys.detach())
        self.version += 1

    def set_text_keys(self, keys: Tensor) -> None:
        """Install the query encoder's vectors of the entries' keys (M, E), row for row with ``ids``."""
        if keys.shape[0] != len(self):
            raise ValueError(f"{keys.shape[0]} text keys for a table of {len(self)} entries")
        self.text = RowIndex(keys.shape[1], index=self.index, device=self.ids.device)
        self.text.set(torch.arange(len(self)), keys.detach())

    @property
    def text_keys(self) -> Tensor | None:
        """(M, E) the query encoder's vectors, row for row with ``ids``; None: not set."""
        return None if self.text is None else self.text.vectors

    def search(self, queries: Tensor, n: int) -> Tensor:
        """queries (Q, key_dim) -> table rows (Q, n) of the largest inner products, best first."""
        return _filled(self.key_index.search(queries, n)[1])

    def search_text(self, queries: Tensor, n: int) -> Tensor:
        """Query encoder embeddings (Q, E) -> table rows (Q, n) of the most similar ``text_keys``."""
        if self.text is None:
            raise ValueError("this key table has no text keys (query_route: search sets them)")
        return _filled(self.text.search(queries, n)[1])


def _filled(rows: Tensor) -> Tensor:
    """An IVF search may find fewer than n rows in the lists it probes: the layer reads n, so the best one
    found fills the gap (every row of a PlugLM table is live, so exact search never leaves one)."""
    return torch.where(rows < 0, rows[:, :1].clamp(min=0), rows)


class PlugLMReader(MemoryReader):
    def __init__(self, model, tokenizer, bank, options: PlugLMOptions) -> None:
        super().__init__(model, tokenizer, bank)
        self.options = options
        self.namespaces = options.namespaces
        self.check_bank(self.namespaces)
        self._fingerprint = tokenizer.fingerprint()
        # (tok fp, hash) -> (key tokens, text tokens, subject tokens at the key's start)
        self._tokens: dict[tuple[str, str], tuple[list[int], list[int], int]] = {}
        self.table: KeyTable | None = None
        self._bank_version: int | None = None
        self._keys_fresh = False  # keys computed from the encoder's current weights
        self._steps = 0
        self.refresh_seconds: list[float] = []  # wall time of each full key refresh (the training stall)
        o = options
        self.question = (
            QuestionReader(o.query_encoder, o.query_encoder_dim, tokenizer) if o.query_encoder else None
        )

    # ---- the table -----------------------------------------------------------------------------
    def _entry_tokens(self, entry) -> tuple[list[int], list[int], int]:
        key = (self._fingerprint, entry.content_hash)
        if key not in self._tokens:
            L = self.options.entry_tokens
            if self.options.key == "parts" and entry.subject and entry.relation:
                key_ids, split = part_tokens(self.tokenizer, entry.subject, entry.relation, L)
            else:
                about = key_text(entry, self.options.key)
                key_ids = self.tokenizer.encode(as_in_a_sentence(about))[:L]
                split = len(key_ids)  # no relation: key: parts pools the whole text into both halves
            self._tokens[key] = (key_ids, self.tokenizer.encode(entry.text)[:L], split)
        return self._tokens[key]

    def _load(self) -> int:
        """(Re)build the table from the bank's entries in scope; returns how many entries were tokenised."""
        before = len(self._tokens)
        entries = list(self.bank.iter_entries(self.namespaces))
        self._bank_version = self.bank.version
        toks = [self._entry_tokens(e) for e in entries]
        live = {(self._fingerprint, e.content_hash) for e in entries}
        fresh = len(self._tokens) - before
        self._tokens = {k: v for k, v in self._tokens.items() if k in live}  # deleted entries leave no trace
        pad, device = self.tokenizer.pad_id, self.model.device
        self.table = KeyTable(
            ids=torch.tensor([e.id for e in entries], dtype=torch.long),
            key_tokens=_pad([a for a, _, _ in toks], pad), key_len=torch.tensor([len(a) for a, _, _ in toks]),
            value_tokens=_pad([t for _, t, _ in toks], pad), value_len=torch.tensor([len(t) for _, t, _ in toks]),
            pad_id=pad, key_dim=self.options.key_dim, index=self.options.index,
            key_split=torch.tensor([n for _, _, n in toks]) if self.options.key == "parts" else None,
        ).to(device)  # fmt: skip
        if self.options.query_route == "search":
            texts = [key_text(e, self.options.key) for e in entries]
            self.table.set_text_keys(
                self.question.entry_vectors(self.bank, [e.id for e in entries], texts, self.options.key)
            )
        self._entries = entries
        self._subject_re = None
        self._keys_fresh = False
        return fresh

    @torch.no_grad()
    def refresh_keys(self) -> float:
        """Recompute every key from the current encoder (a new table version); returns the seconds it took."""
        t0 = time.perf_counter()
        enc, t = self.model.memory, self.table
        keys = [
            enc.keys(t.key_tokens[j], t.key_len[j], None if t.key_split is None else t.key_split[j])
            for j in (slice(i, i + 8192) for i in range(0, len(t), 8192))
        ]
        t.set_keys(torch.cat(keys) if keys else t.keys)
        self._keys_fresh = True
        self.refresh_seconds.append(time.perf_counter() - t0)
        return self.refresh_seconds[-1]

    def refresh(self) -> int:
        """Follow the bank's edits (added, edited, deleted entries; whole namespaces plugged in or out)."""
        if self.table is not None and self.bank.version == self._bank_version:
            return 0
        n = self._load()
        self.refresh_keys()
        return n

    def _ready(self, *, fresh: bool) -> KeyTable:
        self.refresh()
        if fresh and not self._keys_fresh:
            self.refresh_keys()
        return self.table

    # ---- inference -----------------------------------------------------------------------------
    def prompts(self, prompts: Sequence[str]) -> PromptBatch:
        table = self._ready(fresh=True)  # inference reads keys of the weights it runs with
        ids = self.tokenizer.encode_batch(list(prompts), bos=True)
        inputs = PlugInputs(table)
        if self.question is not None:
            L = max((len(r) for r in ids), default=0)
            inputs.text = self.question.embed(prompts)
            inputs.text_mask = self.question.mask(prompts, ids, L, left_pad=True)
            inputs = inputs.to(table.ids.device)
        memory = MemoryContext(inputs=inputs)
        return PromptBatch(token_ids=ids, memory=memory, used=[[] for _ in ids], scores=[[] for _ in ids])

    # ---- training ------------------------------------------------------------------------------
    def train_batch(
        self, texts: Sequence[str], *, rng: random.Random | None = None, train: bool = True
    ) -> TrainBatch:
        table = self._ready(fresh=False)
        if train:
            if self._steps % self.options.refresh_every == 0 and not self._keys_fresh:
                self.refresh_keys()  # the paper's asynchronous index refresh; stale keys until the next one
            self._keys_fresh = False  # the weights move from here on
            self._steps += 1
        swap = self.options.swap_prob if train and rng is not None else 0.0
        noise = self.options.cue_noise if train and rng is not None else 0.0
        rows, golds, used, overrides, swapped, noised = [], [], [], [], [], []
        for text in texts:
            entries = self._subject_entries(text)
            subs = self._swaps(entries, rng, swap) if swap > 0 else {}
            text = _substitute(text, subs)
            swapped.append(text)
            ids, gold = self._tokenise(text, entries, subs)
            if noise > 0 and entries:
                first_object = next((i for i, g in enumerate(gold) if g >= 0), len(ids))
                ids, where = self.cue_noise(text, ids, first_object, entries[0][1].subject, rng, noise)
                noised.append((len(rows), where))
            rows.append(ids)
            golds.append(gold)
            used.append([int(self.table.ids[r]) for r, _ in entries])
            overrides.append([(r, self._value_ids(e, subs)) for r, e in entries if e.object in subs])
        batch = self.collate(rows, [1] * len(rows), used=used)
        B, T = batch.input_ids.shape
        self.ignore_noised(batch.targets, noised)
        text = text_mask = None
        if self.question is not None:
            text = self.question.embed(swapped)
            text_mask = self.question.mask(swapped, rows, T, left_pad=False)
        gold = torch.full((B, T), -1, dtype=torch.long)
        for i, g in enumerate(golds):
            g = g[1 : T + 1]  # position t is labelled with the entry of token t + 1 (its target)
            gold[i, : len(g)] = torch.tensor(g, dtype=torch.long)
        inputs = PlugInputs(table, gold, text=text, text_mask=text_mask).to(table.ids.device)
        J = max(len(o) for o in overrides)
        if J:
            pad = self.tokenizer.pad_id
            orows = torch.full((B, J), -1, dtype=torch.long)
            flat = [ids for o in overrides for _, ids in o]
            L = max(len(x) for x in flat)
            otoks = torch.full((B, J, L), pad, dtype=torch.long)
            for i, o in enumerate(overrides):
                for j, (r, ids) in enumerate(o):
                    orows[i, j] = r
                    otoks[i, j, : len(ids)] = torch.tensor(ids)
            inputs.override_rows, inputs.override_tokens = (
                orows.to(table.ids.device),
                otoks.to(table.ids.device),
            )
        batch.memory = MemoryContext(inputs=inputs)
        return batch

    def _subject_entries(self, text: str) -> list[tuple[int, object]]:
        """(table row, entry) of every triple whose subject is the first bank subject named in ``text``."""
        if self._subject_re is None:
            self._by_subject: dict[str, list[tuple[int, object]]] = {}
            for r, e in enumerate(self._entries):
                if e.subject and e.object:
                    self._by_subject.setdefault(e.subject, []).append((r, e))
            names = sorted(
                self._by_subject, key=len, reverse=True
            )  # longest first: "Ann Lee Jr" over "Ann Lee"
            self._subject_re = (
                re.compile(r"(?<!\w)(" + "|".join(map(re.escape, names)) + r")(?!\w)") if names else False
            )
            pools: dict[str, set[str]] = {}
            for e in self._entries:
                if e.relation and e.object:
                    pools.setdefault(e.relation, set()).add(e.object)
            self._pools = {k: sorted(v) for k, v in pools.items()}
        m = self._subject_re.search(text) if self._subject_re else None
        return self._by_subject[m.group(1)] if m else []

    def _swaps(self, entries, rng: random.Random, p: float) -> dict[str, str]:
        """object -> another value of its relation, for a share ``p`` of the subject's triples."""
        subs: dict[str, str] = {}
        for _, e in entries:
            pool = self._pools.get(e.relation, [])
            if e.object not in subs and len(pool) > 1 and rng.random() < p:
                new = e.object
                while new == e.object:
                    new = pool[rng.randrange(len(pool))]
                subs[e.object] = new
        return subs

    def _value_ids(self, entry, subs: dict[str, str]) -> list[int]:
        return self.tokenizer.encode(_substitute(entry.text, subs))[: self.options.entry_tokens]

    def _tokenise(self, text: str, entries, subs: dict[str, str]) -> tuple[list[int], list[int]]:
        """BOS text EOS as token ids, and per token the table row of the object it belongs to (-1: none).

        Objects are tokenised as their own pieces with the space before them (byte-level BPE splits there
        anyway). An object string shared by two triples (born and working in Paris) gets no label."""
        owners: dict[str, list[int]] = {}
        for r, e in entries:
            owners.setdefault(subs.get(e.object, e.object), []).append(r)
        spans = []
        for obj, rs in owners.items():
            for m in re.finditer(r"(?<!\w)" + re.escape(obj) + r"(?!\w)", text):
                start = m.start() - 1 if m.start() > 0 and text[m.start() - 1] == " " else m.start()
                spans.append((start, m.end(), rs[0] if len(rs) == 1 else -1))
        spans.sort()
        tok = self.tokenizer
        ids, gold, pos = [tok.bos_id], [-1], 0
        for start, end, row in spans:
            if start < pos:  # overlapping matches: keep the first
                continue
            plain, obj = tok.encode(text[pos:start]) if start > pos else [], tok.encode(text[start:end])
            ids += plain + obj
            gold += [-1] * len(plain) + [row] * len(obj)
            pos = end
        rest = tok.encode(text[pos:]) if pos < len(text) else []
        return ids + rest + [tok.eos_id], gold + [-1] * (len(rest) + 1)


def _substitute(text: str, subs: dict[str, str]) -> str:
    """Replace whole-word occurrences of each key of ``subs`` (longest first: "New York City" over "York")."""
    if not subs:
        return text
    pattern = re.compile(
        r"(?<!\w)(" + "|".join(re.escape(s) for s in sorted(subs, key=len, reverse=True)) + r")(?!\w)"
    )
    return pattern.sub(lambda m: subs[m.group(1)], text)


def _pad(rows: Sequence[Sequence[int]], pad: int) -> Tensor:
    L = max((len(r) for r in rows), default=1) or 1
    out = torch.full((len(rows), L), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
