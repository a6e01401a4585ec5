"""RAG: the backbone reads the top-k bank entries as text placed before each sample and each prompt.

The baseline every memory design is compared with, and the test bed of the memory path: the entries are found
by a pretrained text encoder (MiniLM by default) through the bank's :class:`~memlm.index.Retriever`, which
follows the bank's edits, so an edit or a deletion is visible to the next prompt with no training.

What is searched is what an entry is *about* (``key: about``: "subject relation" of a triple, the text of an
entry without one), not its text: a question names its subject and relation, never the answer, and the answer's
words in a key only mislead the encoder (bios, MiniLM, held-out questions: top-1 0.65 by text, 0.97 by about).

Layout of one row (best entry last, nearest the text it serves)::

    BOS  e_k SEP ... e_2 SEP e_1 SEP  MEM  text [EOS]

Causality: a prompt retrieves with the prompt. A training document retrieves with its *query*, its first
sentence (or line), and only the tokens after the query are targets, so no token the sample is trained to
predict ever reaches retrieval (``tests/test_rag.py`` checks both).

``swap_prob`` (training only) replaces, per sample, the object of some retrieved triples by another value of
the same relation, in the entries and in the text alike. A fact whose value changes from epoch to epoch cannot
be stored in the weights; it can only be read (``../shared/DESIGN.md``: "entries edited between epochs").
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memlm.errors import ConfigError
from memlm.model.memory.base import MemoryDesign
from memlm.model.memory.reader import MemoryReader, PromptBatch, TrainBatch
from memlm.model.memory.registry import register_memory_design
from memlm.tokenizer import MEM

_SENTENCE_END = re.compile(r"[.?!](?=\s|$)|\n")
_INITIAL = re.compile(r"(?:\w\.)*[A-Z]")  # "L" of "Ada L. Byron", "U.S" of "U.S."
_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "prof",
    "st",
    "jr",
    "sr",
    "vs",
    "etc",
    "no",
    "inc",
    "ltd",
    "co",
    "e.g",
    "i.e",
}


@dataclass
class RAGOptions:
    k: int = 4  # entries placed before each sample and prompt
    encoder: str = "minilm"  # retriever's text encoder (memlm.encode spec)
    key: str = "about"  # what of an entry is searched: about (subject + relation of a triple) | text
    index: str = "exact"  # exact | faiss | pk (memlm.index); exact is the reference
    index_params: dict[str, Any] = field(default_factory=dict)  # passed to the index class
    namespaces: list[str] | None = None  # retrieval scope; None: every namespace of the bank
    entry_tokens: int = 48  # an entry longer than this many tokens is cut
    separator: str = "\n"  # after each entry
    query_chars: int = 512  # a training query is at most this long (its first sentence or line)
    swap_prob: float = 0.0  # training: share of retrieved triples whose object is swapped (see module doc)
    # Training only, teacher-forced retrieval: of the top `train_pick` hits, read the k whose object the
    # document's continuation names (the data knows what a sample needs; ExplicitLM's gold retrieval loss plays
    # the same role). A model that always finds the right fact learns to read it, not to second-guess it from
    # the question's wording. 0: off (train on plain top-k).
    train_pick: int = 0
    query_noise: float = 0.0  # training: share of query tokens replaced by random ones (answer from memory)

    def __post_init__(self) -> None:
        from memlm.index import KINDS

        if self.k < 1:
            raise ConfigError(f"model.memory_options.k must be >= 1, got {self.k}")
        from memlm.bank.vectors import KEYS

        if self.key not in KEYS:
            raise ConfigError(f"model.memory_options.key must be one of {sorted(KEYS)}, got {self.key!r}")
        if self.index not in KINDS:
            raise ConfigError(
                f"model.memory_options.index must be one of {sorted(KINDS)}, got {self.index!r}"
            )
        for name in ("swap_prob", "query_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"model.memory_options.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.train_pick and self.train_pick < self.k:
            raise ConfigError(f"model.memory_options.train_pick must be 0 or >= k={self.k}")
        if self.entry_tokens < 1 or self.query_chars < 1:
            raise ConfigError("model.memory_options.entry_tokens and query_chars must be >= 1")


def _whole_words(values: Sequence[str]) -> re.Pattern:
    """Any of ``values`` as whole words: "Law" must not match inside "Lawrence"."""
    return re.compile(r"(?<!\w)(" + "|".join(re.escape(v) for v in values) + r")(?!\w)")


def _names(text: str, value: str) -> bool:
    return _whole_words([value]).search(text) is not None


def query_text(text: str, max_chars: int = 512) -> str:
    """A training document's retrieval query: its first sentence or line, at most ``max_chars``.

    A period after an initial or a common abbreviation ("Ada L. Byron", "Dr. Smith") does not end a sentence:
    cutting there would retrieve with half a name.
    """
    for m in _SENTENCE_END.finditer(text, 0, max_chars):
        if m.group() == "\n":
            return text[: m.start()]
        word = text[: m.start()].rsplit(None, 1)[-1] if text[: m.start()].strip() else ""
        if m.group() == "." and (_INITIAL.fullmatch(word) or word.lower() in _ABBREVIATIONS):
            continue
        return text[: m.end()]
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars)
    return text[: cut if cut > 0 else max_chars]


def swap_objects(
    text: str, entries: Sequence, rng: random.Random, p: float, pools: dict[str, list[str]]
) -> tuple[str, list[str]]:
    """Replace the objects of some triples (each with probability ``p``) by other values of their relation,
    in the entries' texts and in ``text`` alike. ``entries``: anything with ``relation``, ``object``, ``text``;
    ``pools``: relation -> its values (:func:`object_pools`). Returns the new text and the entries' new texts."""
    sub = object_swapper(entries, rng, p, pools)
    return sub(text), [sub(e.text) for e in entries]


def object_swapper(
    entries: Sequence, rng: random.Random, p: float, pools: dict[str, list[str]]
) -> Callable[[str], str]:
    """Draw the new objects of :func:`swap_objects` and return the rewrite itself, for any text (Memory³ applies
    it to the entries later chunks of a document read, too)."""
    subs: dict[str, str] = {}
    for e in entries:
        pool = pools.get(e.relation or "", [])
        if e.object and e.object not in subs and len(pool) > 1 and rng.random() < p:
            new = e.object
            while new == e.object:
                new = pool[rng.randrange(len(pool))]
            subs[e.object] = new
    if not subs:
        return lambda s: s
    pattern = _whole_words(sorted(subs, key=len, reverse=True))  # longest first: "New York City" wins
    return lambda s: pattern.sub(lambda m: subs[m.group(1)], s)


def object_pools(bank, namespaces: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Relation -> the distinct objects the bank holds for it (in ``namespaces``), sorted."""
    sql = "SELECT DISTINCT relation, object FROM entries WHERE relation IS NOT NULL AND object IS NOT NULL"
    args: list = []
    if namespaces is not None:
        sql += f" AND namespace IN ({','.join('?' * len(namespaces))})"
        args = list(namespaces)
    pools: dict[str, list[str]] = {}
    for rel, obj in bank.connection.execute(sql + " ORDER BY relation, object", args):
        pools.setdefault(rel, []).append(obj)
    return pools


@register_memory_design("rag")
class RAG(MemoryDesign):
    options_class = RAGOptions
    uses_bank = True

    def reader(self, model, tokenizer, bank=None) -> RAGReader:
        return RAGReader(model, tokenizer, bank, self.options(model.config))


class RAGReader(MemoryReader):
    def __init__(self, model, tokenizer, bank, options: RAGOptions) -> None:
        super().__init__(model, tokenizer, bank)
        self.options = options
        self.namespaces = options.namespaces
        self.check_bank(self.namespaces)
        self.mem_id = tokenizer.token_id(MEM)
        self._sep = tokenizer.encode(options.separator)
        self._retriever = None
        self._entry_cache: dict[tuple[int, str], list[int]] = {}
        self._train_hits: dict[str, list[int]] = {}
        self._pools: dict[str, list[str]] | None = None

    # ---- retrieval -----------------------------------------------------------------------------
    @property
    def retriever(self):
        if self._retriever is None:
            from memlm.encode import load_encoder
            from memlm.index import Retriever

            o = self.options
            big = self.bank.count() >= 20_000  # a progress bar where encoding takes a while
            # The index saved in the bank (refreshed from its edit log) when there is one: only the first
            # reader of a bank pays for the build.
            self._retriever = Retriever.open_or_build(
                self.bank, load_encoder(o.encoder), kind=o.index, key=o.key, progress=big, **o.index_params
            )
        return self._retriever

    def refresh(self) -> int:
        return self.retriever.refresh()

    def search(
        self, queries: Sequence[str], k: int | None = None
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Top-k entry ids (best first) and scores per query; -1 padding dropped."""
        if not queries:
            return [], []
        scores, ids = self.retriever.search(list(queries), k or self.options.k, self.namespaces)
        keep = ids >= 0
        return (
            [row[m].tolist() for row, m in zip(ids, keep)],
            [row[m].tolist() for row, m in zip(scores, keep)],
        )

    def _entries(self, ids: Sequence[int]) -> list:
        # missing_ok: an entry deleted between search and read is skipped, never shown.
        return [e for e in self.bank.get_many(ids, missing_ok=True) if e is not None]

    def _entry_ids(self, entry, text: str | None = None) -> list[int]:
        key = (entry.id, entry.content_hash)
        if text is not None:  # a swapped text: tokenise, do not cache
            return self.tokenizer.encode(text)[: self.options.entry_tokens] + self._sep
        if key not in self._entry_cache:
            ids = self.tokenizer.encode(entry.text)[: self.options.entry_tokens]
            self._entry_cache[key] = ids + self._sep
        return self._entry_cache[key]

    def memory_tokens(self, entries: Sequence, texts: Sequence[str] | None = None) -> list[int]:
        """BOS e_k SEP ... e_1 SEP MEM for entries given best first."""
        out = [self.tokenizer.bos_id]
        for j in reversed(range(len(entries))):
            out += self._entry_ids(entries[j], None if texts is None else texts[j])
        return [*out, self.mem_id]

    # ---- inference -----------------------------------------------------------------------------
    def prompts(self, prompts: Sequence[str]) -> PromptBatch:
        ids, scores = self.search(prompts)
        rows, used = [], []
        for prompt, row in zip(prompts, ids):
            entries = self._entries(row)
            rows.append(self.memory_tokens(entries) + self.tokenizer.encode(prompt))
            used.append([e.id for e in entries])
        return PromptBatch(token_ids=rows, used=used, scores=scores)

    # ---- training ------------------------------------------------------------------------------
    def prepare_training(self, texts: Sequence[str], *, progress: bool = False) -> None:
        from tqdm import tqdm

        queries = list(dict.fromkeys(query_text(t, self.options.query_chars) for t in texts))
        queries = [q for q in queries if q not in self._train_hits]
        bar = tqdm(total=len(queries), desc="rag: retrieve for training", unit=" docs", disable=not progress)
        for i in range(0, len(queries), 512):
            part = queries[i : i + 512]
            self._train_hits.update(zip(part, self.search(part, self._train_k)[0]))
            bar.update(len(part))
        bar.close()

    @property
    def _train_k(self) -> int:
        return max(self.options.k, self.options.train_pick)

    def _pick(self, hits: list[int], continuation: str) -> list:
        """The k entries a training sample reads: with ``train_pick``, those of the hits whose object the
        continuation names come first (in rank order), the best other hits fill up."""
        entries = self._entries(hits)
        k = self.options.k
        if not self.options.train_pick:
            return entries[:k]
        named = [e for e in entries if e.object and _names(continuation, e.object)]
        return (named + [e for e in entries if e not in named])[:k]

    def train_batch(
        self, texts: Sequence[str], *, rng: random.Random | None = None, train: bool = True
    ) -> TrainBatch:
        queries = [query_text(t, self.options.query_chars) for t in texts]
        missing = [q for q in dict.fromkeys(queries) if q not in self._train_hits]
        if missing:
            self._train_hits.update(zip(missing, self.search(missing, self._train_k)[0]))
        augment = train and rng is not None
        swap = self.options.swap_prob if augment else 0.0
        rows, loss_from, query_len, used = [], [], [], []
        for text, query in zip(texts, queries):
            hits = self._train_hits[query]
            entries = (
                self._pick(hits, text[len(query) :]) if augment else self._entries(hits[: self.options.k])
            )
            entry_texts = None
            if swap > 0:
                if self._pools is None:
                    self._pools = object_pools(self.bank, self.namespaces)
                text, entry_texts = swap_objects(text, entries, rng, swap, self._pools)
                query = query_text(text, self.options.query_chars)
            memory = self.memory_tokens(entries, entry_texts)
            q = self.tokenizer.encode(query)
            if augment and self.options.query_noise > 0:
                q = [self._noise(t, rng) for t in q]
            rest = self.tokenizer.encode(text[len(query) :]) + [self.tokenizer.eos_id]
            rows.append(memory + q + rest)
            loss_from.append(len(memory) + len(q))
            query_len.append(len(memory) + len(q))
            used.append([e.id for e in entries])
        return self.collate(rows, loss_from, query_len=query_len, used=used)

    def _noise(self, token: int, rng: random.Random) -> int:
        if rng.random() >= self.options.query_noise:
            return token
        return self.random_token(rng)
