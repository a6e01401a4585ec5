"""Which relation of the bank a sentence asks for: a pretrained encoder reads it against the bank's schema.

LMLM's model writes the relation of its lookup itself (``<|db_relationship|> birth_city``). A small model
trained from scratch writes the right name for the phrasings it trained on and guesses for the others ("What
is X's hometown?" is no phrasing it has seen). A pretrained text encoder (MiniLM) knows that a hometown is a
city of birth; it reads the sentence the call was written in and scores every relation the bank uses by

    cos(sentence, name of r) + cos(sentence, how the bank states r) + written_weight * cos(written, name of r)

where "how the bank states r" is the text of the relation's first entry with its subject and object blanked
("someone was born in something."), and the last term is the model's own choice as evidence: the name it wrote
scores 1 against itself, a paraphrase it made up scores by similarity. The best relation is looked up; the
entity stays what the model wrote. Everything is derived from the bank and follows its edits: a relation no
entry uses any more is no candidate.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from memlm.bank.store import MemoryBank
from memlm.encode.base import Encoder

SOMEONE, SOMETHING = "someone", "something"


def blank(text: str, subject: str | None, obj: str | None) -> str:
    """The entry's text with its subject and object replaced by neutral words (the relation's wording stays)."""
    if obj:
        text = text.replace(obj, SOMETHING)
    if subject:
        text = text.replace(subject, SOMEONE)
    return text


class RelationIndex:
    """``resolve(sentences, written, namespaces) -> [(relation, score)]``: the bank relation each sentence asks for."""

    def __init__(
        self, bank: MemoryBank, encoder: Encoder, *, written_weight: float = 0.5, cache_size: int = 4096
    ) -> None:
        self.bank, self.encoder, self.written_weight = bank, encoder, written_weight
        self._version = -1
        self._names: list[str] = []  # relation names as the bank spells them
        self._spaces: list[set[str]] = []  # namespaces each relation occurs in
        self._name_vecs = self._text_vecs = np.zeros((0, 0), np.float32)
        # Vectors of texts only (sentences with the entity blanked, relation names): no fact's value is ever
        # cached here, so nothing deleted can come back through it. Sentences repeat across entities.
        self._vec_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, d) vectors of ``texts``, through a least-recently-used cache."""
        new = [t for t in dict.fromkeys(texts) if t not in self._vec_cache]
        if new:
            self._vec_cache.update(zip(new, self.encoder.encode(new)))
        out = np.stack([self._vec_cache[t] for t in texts])
        for t in texts:
            self._vec_cache.move_to_end(t)
        while len(self._vec_cache) > max(self._cache_size, len(texts)):
            self._vec_cache.popitem(last=False)
        return out

    def clear_cache(self) -> None:
        """Forget the cached sentence vectors (benchmarks time every decode path from the same cold start)."""
        self._vec_cache.clear()

    def refresh(self) -> None:
        """Re-read the schema (relations in use and the first entry stating each) when the bank changed."""
        if self.bank.version == self._version:
            return
        rows = self.bank.connection.execute(
            "SELECT e.relation, e.namespace, e.text, e.subject, e.object FROM entries e JOIN "
            "(SELECT relation, MIN(id) AS id FROM entries WHERE relation IS NOT NULL GROUP BY relation) f "
            "ON e.id = f.id ORDER BY e.relation"
        ).fetchall()
        spaces: dict[str, set[str]] = {}
        for rel, ns in self.bank.connection.execute(
            "SELECT DISTINCT relation, namespace FROM entries WHERE relation IS NOT NULL"
        ):
            spaces.setdefault(rel, set()).add(ns)
        self._names = [r[0] for r in rows]
        self._spaces = [spaces[n] for n in self._names]
        self._name_vecs = self._encode([readable(n) for n in self._names])
        self._text_vecs = self._encode([blank(t, s, o) for _, _, t, s, o in rows])
        self._version = self.bank.version

    def resolve(
        self, sentences: Sequence[str], written: Sequence[str], namespaces: Sequence[str] | None = None
    ) -> list[tuple[str | None, float]]:
        """Per sentence, the best relation in ``namespaces`` and its score; (None, 0) when there is none."""
        self.refresh()
        allowed = np.array(
            [namespaces is None or bool(s & set(namespaces)) for s in self._spaces], dtype=bool
        )
        if not sentences or not allowed.any():
            return [(None, 0.0)] * len(sentences)
        q = self._encode(list(sentences))  # (B, d)
        w = self._encode([readable(x) for x in written])  # (B, d)
        scores = q @ self._name_vecs.T + q @ self._text_vecs.T + self.written_weight * (w @ self._name_vecs.T)
        scores[:, ~allowed] = -np.inf  # (B, R)
        best = scores.argmax(1)
        return [(self._names[j], float(scores[i, j])) for i, j in enumerate(best)]


def readable(relation: str) -> str:
    """``birth_city`` -> ``birth city``: the encoder reads words."""
    return " ".join(relation.replace("_", " ").split())
