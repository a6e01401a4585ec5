"""LMLM: the model writes database lookups; generation pauses for the bank and goes on with its KV cache.

Paper: "Pre-training Large Memory Language Models with Internal and External Knowledge" (LMLM, arXiv
2505.15962; ``../shared/seeds/003``). The model is trained on text in which every fact carries its lookup,
``<|db_entity|> E<|db_relationship|> R<|db_return|> V<|db_end|> V``, with the value ``V`` and ``<|db_end|>``
masked from the loss (:func:`memlm.data.annotate.annotate_ids`): it learns to *ask* and to repeat what the
database answers, never to produce the value from its weights. There are no memory parameters: the backbone
is a plain GPT, and the bank is read through the text.

What memlm does differently from the public code:

- **The KV cache is kept across lookups, and the batch goes on.** When a row emits ``<|db_return|>`` the step
  hook parses (E, R), looks it up and *forces* `` V<|db_end|>`` into that row (:meth:`DecodeState.force`):
  the forced tokens go through the same cache in one forward call, while the other rows keep sampling.
  The public code stops, re-tokenises the whole text and regenerates from scratch after every lookup, one
  sequence at a time (:func:`decode_regenerating` does that, as the benchmarks' reference line).
- **Lookups are exact, then alias, then fuzzy** (:class:`~memlm.index.LexicalIndex`), scoped by namespace,
  instead of an embedding top-1 above 0.6. A subject or relation the bank knows exactly is never fuzzily
  moved to a neighbour, which is how the public design leaked 0.7-13.6% of deleted facts: a deleted fact is
  answered ``unknown``. Every answer is re-read from the bank; no lookup result is cached.
- **An unknown fact returns a value the model saw in training** (``options.unknown``): a share of training
  documents (``unknown_prob``) look up a person absent from the bank and get that value back.
- **A trace of every lookup** (query, matched entry id, match kind, score, value) comes back with the answer
  (:attr:`Generation.trace`, ``memlm generate --sources``).
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

import torch

from memlm.bank.entry import normalise
from memlm.data.annotate import annotate_ids, call_string, parse_calls, strip_calls
from memlm.data.pack import IGNORE_INDEX
from memlm.errors import ConfigError
from memlm.index.relations import SOMEONE
from memlm.model.memory.base import MemoryDesign
from memlm.model.memory.reader import MemoryReader, PromptBatch, TrainBatch
from memlm.model.memory.registry import register_memory_design
from memlm.tokenizer import DB_END, DB_ENTITY, DB_RELATIONSHIP, DB_RETURN

# A clause ends at a sentence end followed by a space, or a line end (the entity, where initials would break
# this, is already replaced by a neutral word).
_CLAUSE_END = re.compile(r"(?<=[.?!])\s+|\n")
_NAME_WORDS = 6  # the longest name (in words) that entity=context looks for in the text


def _trim(words: str) -> str:
    """A phrase without the punctuation around it or a possessive ("Ada L. Byron's" -> "Ada L. Byron"); a final
    full stop stays only after an initial ("V.")."""
    words = re.sub(r"['\u2019]s$", "", words.strip(' ?!,;:"()')).strip(" ?!,;:\"'()")
    if words.endswith(".") and len(words.rsplit(" ", 1)[-1]) > 2:
        words = words[:-1]
    return words


@dataclass
class LMLMOptions:
    encoder: str | None = "minilm"  # fuzzy matching (memlm.encode spec); None: exact and alias lookups only
    threshold: float = 0.8  # fuzzy: cosine a subject (and a paraphrased relation) must reach
    namespaces: list[str] | None = None  # lookup scope; None: every namespace of the bank
    unknown: str = "unknown"  # the value of a fact the bank does not hold (trained on: unknown_prob)
    unknown_prob: float = 0.1  # training: share of one-call documents rewritten to ask about an absent name
    max_call_tokens: int = 64  # a longer call (a runaway entity or relation) is answered unknown
    lookup_steps: int = 32  # decoding steps beyond max_new_tokens for lookups (they are not answer text)
    relation: str = "written"  # written: as the model wrote it | context: what its sentence asks for
    entity: str = "written"  # written: as the model wrote it | context: the subject the text before it names
    mention_words: int = 32  # context entity: the last this many words before a call are searched for names
    written_weight: float = 0.5  # context: weight of the written relation against the sentence
    context_words: int = 3  # context: a call's sentence is its last clause, extended to this many words
    disabled: bool = False  # ablation: every lookup answers `unknown` (the paper's "without the database")

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"model.memory_options.threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.unknown_prob <= 1.0:
            raise ConfigError(f"model.memory_options.unknown_prob must be in [0, 1], got {self.unknown_prob}")
        if not self.unknown.strip():
            raise ConfigError("model.memory_options.unknown must be a non-empty string")
        if self.relation not in ("written", "context"):
            raise ConfigError(
                f"model.memory_options.relation must be written or context, got {self.relation!r}"
            )
        if self.entity not in ("written", "context"):
            raise ConfigError(f"model.memory_options.entity must be written or context, got {self.entity!r}")
        if self.relation == "context" and not self.encoder:
            raise ConfigError("model.memory_options.relation=context needs an encoder (e.g. minilm)")
        if self.lookup_steps < 0:
            raise ConfigError(f"model.memory_options.lookup_steps must be >= 0, got {self.lookup_steps}")
        if self.max_call_tokens < 4:
            raise ConfigError(
                f"model.memory_options.max_call_tokens must be >= 4, got {self.max_call_tokens}"
            )


@register_memory_design("lmlm")
class LMLM(MemoryDesign):
    options_class = LMLMOptions
    uses_bank = True
    annotation = "lmlm"  # trains on text annotated with its lookups (corpus/*_lmlm.jsonl; memlm experiment)

    def reader(self, model, tokenizer, bank=None) -> LMLMReader:
        return LMLMReader(model, tokenizer, bank, self.options(model.config))


@dataclass(frozen=True)
class Answer:
    """What one lookup gave: the value forced into the text and where it came from."""

    value: str
    entry_id: int | None  # the bank entry read; None when the answer is `unknown`
    how: str  # exact | alias | fuzzy | none (no match) | malformed (no parsable call) | disabled
    score: float
    relation: str = ""  # the relation looked up (the written one, or the one the sentence asks for)


class LMLMReader(MemoryReader):
    skip_special_tokens = False  # the lookups are part of the answer's text (QA scoring strips them)

    def __init__(self, model, tokenizer, bank, options: LMLMOptions) -> None:
        super().__init__(model, tokenizer, bank)
        self.options = options
        self.namespaces = options.namespaces
        self.check_bank(self.namespaces)
        self.entity_id, self.relation_id, self.return_id, self.end_id = (
            tokenizer.token_id(t) for t in (DB_ENTITY, DB_RELATIONSHIP, DB_RETURN, DB_END)
        )
        self._index = None
        self._relations = None
        self._exact = None
        self._name_parts: list[list[str]] | None = None  # words of the training subjects, per position

    # ---- lookups -------------------------------------------------------------------------------
    @property
    def index(self):
        if self._index is None:
            from memlm.index import LexicalIndex

            enc = None
            if self.options.encoder:
                from memlm.encode import load_encoder

                enc = load_encoder(self.options.encoder)
            self._index = LexicalIndex(self.bank, enc, threshold=self.options.threshold)
        return self._index

    # The fuzzy index is built and changed in inference mode only, wherever it is called from (the decode runs
    # in it, the edit/delete evaluations refresh outside it; torch refuses to change an inference tensor
    # outside inference mode).
    @torch.inference_mode()
    def refresh(self) -> int:
        """The fuzzy index follows the bank's edit log; exact and alias lookups read the bank itself."""
        if self.options.encoder:
            before = self.index._version
            self.index.refresh()
            return len(self.bank.changed_since(before)) if before >= 0 else self.bank.count()
        return 0

    @property
    def relations(self):
        if self._relations is None:
            from memlm.index.relations import RelationIndex

            self._relations = RelationIndex(
                self.bank, self.index.encoder, written_weight=self.options.written_weight
            )
        return self._relations

    def lookup(self, entity: str, relation: str, sentence: str | None = None) -> Answer:
        """(E, R) -> the value to force. Never cached: every answer is read from the bank as it is now."""
        return self.lookup_many([(entity, relation, sentence)])[0]

    @torch.inference_mode()
    def lookup_many(self, calls: Sequence[tuple[str, str, str | None]]) -> list[Answer]:
        """Each (entity, written relation, sentence of the call) -> its :class:`Answer`, in one encoder batch.

        ``relation: context`` swaps the written relation for the bank relation that the sentence asks for
        (:class:`~memlm.index.relations.RelationIndex`); the entity is always the one written.
        """
        o = self.options
        out: list[Answer | None] = [None] * len(calls)
        for i, (entity, relation, _) in enumerate(calls):
            if o.disabled:
                out[i] = Answer(o.unknown, None, "disabled", 0.0, relation)
            elif not entity.strip() or not relation.strip():
                out[i] = Answer(o.unknown, None, "malformed", 0.0, relation)
        todo = [i for i, a in enumerate(out) if a is None]
        asked = {i: calls[i][1] for i in todo}
        if o.relation == "context":
            use = [i for i in todo if calls[i][2]]
            resolved = self.relations.resolve(
                [calls[i][2] for i in use], [calls[i][1] for i in use], self.namespaces
            )
            asked.update((i, rel) for i, (rel, _) in zip(use, resolved) if rel is not None)
        for i in todo:
            hit = self.index.lookup(calls[i][0], asked[i], self.namespaces)
            if hit is None or hit.entry.object is None:
                out[i] = Answer(o.unknown, None, "none", 0.0, asked[i])
            else:
                out[i] = Answer(hit.entry.object, hit.entry.id, hit.how, float(hit.score), asked[i])
        return out

    def named_entity(self, ids: Sequence[int], written: str) -> str:
        """The subject a call is about, for ``entity: context``: the written entity when the text before the
        call (``ids``, earlier calls removed) names it; else, of the subjects the bank knows exactly (or by
        alias) that the last ``mention_words`` words name, the one spelt most like the written entity (the
        latest on ties); else the written entity. A small model miscopies names ("Emil I. Edbrook" for the
        "Cecilia I. Edbrook" it was asked about); the name it meant is in its context. Only exact names are
        taken from the text, so a deleted fact stays deleted: its subject's other entries do not answer it."""
        text = strip_calls(self.tokenizer.decode(ids))
        want = normalise(written)
        if want and want in normalise(text):
            return written
        words = text.split()[-self.options.mention_words :]
        best, best_key = written, None
        seen: set[str] = set()
        for end in range(1, len(words) + 1):
            for n in range(1, min(_NAME_WORDS, end) + 1):
                name = _trim(" ".join(words[end - n : end]))
                if not name or name in seen:
                    continue
                seen.add(name)
                if self.index.subject_entries(name, self.namespaces):
                    key = (SequenceMatcher(None, want, normalise(name)).ratio(), end)
                    if best_key is None or key >= best_key:
                        best, best_key = name, key
        return best

    def call_sentence(self, ids: Sequence[int], entity: str) -> str:
        """The clause a call was written in: the text before it (earlier calls removed), the entity replaced by
        a neutral word, from its last sentence or line, extended backwards to ``context_words`` words
        (``Q: Where was someone born? A:`` for a question, ``someone hails from`` inside a biography)."""
        text = strip_calls(self.tokenizer.decode(ids)).replace(entity, SOMEONE) if entity else ""
        pieces = [p for p in _CLAUSE_END.split(text) if p.strip()]
        out: list[str] = []
        while pieces and sum(len(p.split()) for p in out) < self.options.context_words:
            out.insert(0, pieces.pop().strip())
        return " ".join(out)

    def parse_call(self, ids: Sequence[int]) -> tuple[str, str, int] | None:
        """Token ids ending in ``<|db_return|>`` -> (entity, relation, index of its ``<|db_entity|>``), or None."""
        n = len(ids) - 1  # ids[n] is <|db_return|>
        lo = max(0, n - self.options.max_call_tokens)
        start = next((j for j in range(n - 1, lo - 1, -1) if ids[j] in (self.entity_id, self.end_id)), -1)
        if start < 0 or ids[start] != self.entity_id:
            return None  # no <|db_entity|> since the last finished call, within reach
        body = list(ids[start + 1 : n])
        if body.count(self.relation_id) != 1 or self.return_id in body:
            return None
        cut = body.index(self.relation_id)
        decode = self.tokenizer.decode
        return decode(body[:cut]).removeprefix(" "), decode(body[cut + 1 :]).removeprefix(" "), start

    def _read_call(self, context: Sequence[int]) -> tuple[str, str, str | None]:
        """(entity, relation, sentence) of the call that ``context`` (ending in ``<|db_return|>``) closes: the
        entity as written, or as the text names it (``entity: context``)."""
        n = self.options.max_call_tokens + 1
        call = self.parse_call(context[-n:])
        if call is None:
            return "", "", None
        entity, relation, start = call
        before = context[: max(len(context) - n, 0) + start]
        if self.options.entity == "context" and entity.strip():
            entity = self.named_entity(before, entity)
        sentence = None
        if self.options.relation == "context":
            sentence = self.call_sentence(before, entity)
        return entity, relation, sentence

    def value_ids(self, value: str) -> list[int]:
        """`` V<|db_end|>`` as training saw it (the value keeps the space the grammar puts before it)."""
        return [*self.tokenizer.encode(" " + value), self.end_id]

    # ---- inference -----------------------------------------------------------------------------
    def decode_steps(self, max_new_tokens: int) -> int:
        return max_new_tokens + self.options.lookup_steps

    def text_tokens(self, token_ids: Sequence[int]) -> int:
        """How many of these generated tokens are text: those outside ``<|db_entity|> ... <|db_end|>``."""
        n, inside = 0, False
        for t in token_ids:
            if t == self.entity_id:
                inside = True
            elif inside:
                inside = t != self.end_id
            else:
                n += 1
        return n

    def step_hook(self, batch: PromptBatch):
        """Before each forward: every live row whose last token is ``<|db_return|>`` gets its value forced.

        The last token is the one the next forward call feeds, so the value follows it in the same cache;
        rows that are not at a lookup are untouched and keep decoding. A row ends once its text (lookups not
        counted) reaches ``batch.max_text_tokens``.
        """
        prompts, budget = batch.token_ids, batch.max_text_tokens

        def hook(state) -> None:
            rows, calls, written = [], [], []
            for i, toks in enumerate(state.tokens):
                if state.finished[i] or state.forced[i]:
                    continue
                if (toks[-1] if toks else prompts[i][-1]) != self.return_id:
                    if budget is not None and len(toks) >= budget and self.text_tokens(toks) >= budget:
                        state.finished[i] = True
                    continue
                rows.append(i)
                context = [*prompts[i], *toks]
                calls.append(self._read_call(context))
                call = self.parse_call(context[-(self.options.max_call_tokens + 1) :])
                written.append(call[0] if call else "")
            if not rows:
                return
            answers = self.lookup_many(calls)
            for i, (entity, relation, _), name, answer in zip(rows, calls, written, answers):
                state.force(i, self.value_ids(answer.value))
                state.record(
                    i,
                    entry_ids=[answer.entry_id] if answer.entry_id is not None else [],
                    kind="lookup",
                    entity=name,  # as written
                    looked_up=entity,  # the same, or the name the text gives (entity=context)
                    relation=relation,
                    asked=answer.relation,
                    match=answer.how,
                    score=answer.score,
                    value=answer.value,
                )

        return hook

    # ---- training ------------------------------------------------------------------------------
    def prepare_training(self, texts: Sequence[str], *, progress: bool = False) -> None:
        """Refuse plain text (nothing to learn to look up); collect the subjects' words for unknown lookups."""
        calls = [c for t in texts for c in parse_calls(t)]
        if texts and not calls:
            raise ConfigError(
                "memory lmlm trains on text annotated with lookups (e.g. corpus/train_lmlm.jsonl written by "
                "`memlm data bios`); the training documents hold none"
            )
        self._collect_names(sorted({c.entity for c in calls}))

    def _collect_names(self, subjects: Sequence[str]) -> None:
        parts: list[list[str]] = []
        for s in subjects:
            words = s.split()
            if len(words) >= 2:  # one-word subjects cannot be recombined into an absent name
                parts.append(words)
        self._name_parts = parts

    def absent_subject(self, subject: str, rng: random.Random, tries: int = 8) -> str | None:
        """A name shaped like ``subject`` made of words of other training subjects, unknown to the bank."""
        if self._name_parts is None:
            self._collect_names([])
        pool = [p for p in self._name_parts if len(p) == len(subject.split())]
        if len(pool) < 2:
            return None
        for _ in range(tries):
            name = " ".join(pool[rng.randrange(len(pool))][j] for j in range(len(pool[0])))
            if name != subject and not self._subject_known(name):
                return name
        return None

    def _subject_known(self, subject: str) -> bool:
        if self._exact is None:
            from memlm.index import LexicalIndex

            self._exact = LexicalIndex(self.bank, None)  # no encoder: training never loads one
        return bool(self._exact.subject_entries(subject, self.namespaces))

    def unknown_variant(self, text: str, rng: random.Random) -> str:
        """A one-call document about an absent person: the subject renamed everywhere, the value ``unknown``.

        ``Q: Where was Ada L. Byron born?\\nA:<call Ada L. Byron, birth_city -> Paris> Paris`` becomes the same
        question about a name the bank does not hold, answered ``unknown`` in the call and in the text, which
        is what a lookup of it returns at inference. Documents with several calls are left alone.
        """
        calls = parse_calls(text)
        if len(calls) != 1:
            return text
        c = calls[0]
        name = self.absent_subject(c.entity, rng)
        if name is None:
            return text
        head, tail = text[: c.start], text[c.end :]
        unknown = self.options.unknown
        # The value repeated after the call: only the first occurrence, whole words.
        tail = re.sub(r"(?<!\w)" + re.escape(c.value) + r"(?!\w)", unknown, tail, count=1)
        swap = lambda s: re.sub(r"(?<!\w)" + re.escape(c.entity) + r"(?!\w)", name, s)  # noqa: E731
        return swap(head) + call_string(name, c.relation, unknown) + swap(tail)

    def train_batch(
        self, texts: Sequence[str], *, rng: random.Random | None = None, train: bool = True
    ) -> TrainBatch:
        """``BOS doc EOS`` with the looked-up values and ``<|db_end|>`` masked from the loss."""
        tok = self.tokenizer
        p = self.options.unknown_prob if train and rng is not None else 0.0
        rows, keep = [], []
        for text in texts:
            if p > 0 and rng.random() < p:
                text = self.unknown_variant(text, rng)
            ids, mask = annotate_ids(tok, text)
            rows.append([tok.bos_id, *ids, tok.eos_id])
            keep.append([False, *mask, True])
        batch = self.collate(rows, [1] * len(rows))
        T = batch.targets.shape[1]
        # target t predicts token t + 1: masked where token t + 1 is a looked-up value or <|db_end|>
        never = torch.tensor([[not k for k in row[1 : T + 1]] + [False] * (T + 1 - len(row)) for row in keep])
        batch.targets[never] = IGNORE_INDEX
        return batch


@torch.inference_mode()
def decode_regenerating(
    reader: LMLMReader,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    eos_id: int,
    calls: dict[int, Sequence[int]] | None = None,
) -> list[int]:
    """The public code's decoding, for reference: one sequence, greedy; at ``<|db_return|>`` stop, look up,
    append `` V<|db_end|>`` and start again from scratch on the whole text (the KV cache is thrown away).

    ``calls``: tokens to write once ``n`` tokens are generated (a stand-in for a model that writes its own
    calls, for benchmarks and tests; :func:`scheduled_calls` is the same schedule for the cached decode).
    Returns the generated tokens (forced ones included), which equal the cached decode's.
    """
    from memlm.generate import GenerationConfig, decode

    model, tok = reader.model, reader.tokenizer
    ids, out = list(prompt), []
    # the scripted calls count tokens over the whole answer, across the restarts
    write_calls = scheduled_calls([calls or {}], offset=lambda: len(out))
    while len(out) < max_new_tokens:
        if ids[-1] == reader.return_id:
            answer = reader.lookup(*reader._read_call(ids))
            forced = reader.value_ids(answer.value)[: max_new_tokens - len(out)]
            ids, out = ids + forced, out + forced
            continue
        cfg = GenerationConfig(max_new_tokens=max_new_tokens - len(out), stop_token_ids=(reader.return_id,))
        new = decode(model, [ids], cfg, pad_id=tok.pad_id, eos_id=eos_id, hook=write_calls).tokens[0]
        ids, out = ids + new, out + new
        if not new or new[-1] != reader.return_id:
            break
    return out


def scheduled_calls(calls: Sequence[dict[int, Sequence[int]]], offset: Callable[[], int] = lambda: 0):
    """A step hook that writes ``calls[row][n]`` into a row once it has ``n`` tokens (``offset()`` more than the
    decode generated) and nothing forced, one token a forward as a trained model would write it (forced all at
    once, the call would cost one forward and flatter the benchmarks): a stand-in for benchmarks and tests of
    untrained weights. Run it after the reader's hook, which answers the calls."""
    pending = [sorted(c.items()) for c in calls]
    writing = [deque() for _ in calls]

    def hook(state) -> None:
        for i, todo in enumerate(pending):
            if state.forced[i] or state.finished[i]:
                continue
            if not writing[i] and todo and todo[0][0] <= offset() + len(state.tokens[i]):
                writing[i].extend(todo.pop(0)[1])
            if writing[i]:
                state.force(i, [writing[i].popleft()])

    return hook
