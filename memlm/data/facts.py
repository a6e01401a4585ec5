"""The ``facts.jsonl`` format every knowledge source writes and the bank imports.

One JSON object per line, keys sorted::

    {"subject": str, "relation": str, "object": str, "text": str,
     "namespace": str?, "source": str?, "aliases": [str]?}

Field rules (types, empty values, unknown keys refused) are the bank's: :func:`memlm.bank.records.validate`.

``text`` is one human-readable sentence stating the fact. A fact's ``fact_id`` is its 0-based line index;
QA, edit and deletion records refer to facts by it (and by ``(subject, relation)``, which is unique).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from memlm.bank.records import validate
from memlm.errors import InputError
from memlm.utils.jsonl import iter_jsonl

_ENCODER = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True
)  # one encoder: cheaper than json.dumps per line
REQUIRED = ("subject", "relation", "object", "text")


@dataclass(frozen=True, slots=True)
class Fact:
    subject: str
    relation: str
    object: str
    text: str
    namespace: str | None = None
    source: str | None = None
    aliases: tuple[str, ...] = field(default=())

    def to_json(self) -> str:
        """One line of ``facts.jsonl`` (no newline); optional fields only when set."""
        obj: dict = {
            "subject": self.subject,
            "relation": self.relation,
            "object": self.object,
            "text": self.text,
        }
        if self.namespace is not None:
            obj["namespace"] = self.namespace
        if self.source is not None:
            obj["source"] = self.source
        if self.aliases:
            obj["aliases"] = list(self.aliases)
        return _ENCODER.encode(obj)


def fact_from_obj(obj, *, path: str | os.PathLike | None = None, line: int | None = None) -> Fact:
    """Validate one decoded JSON value as a fact (the bank's rules, :func:`memlm.bank.records.validate`,
    with the whole triple and the text required); errors name the path, line and field."""
    rec = validate(obj, path=path, line=line, require=REQUIRED)
    return Fact(rec["subject"], rec["relation"], rec["object"], rec["text"], obj.get("namespace"),
                rec["source"], rec["aliases"])  # fmt: skip


def iter_facts(path: str | os.PathLike) -> Iterator[Fact]:
    """Stream the facts of a ``facts.jsonl`` file, validating every line."""
    for lineno, obj in iter_jsonl(path):
        yield fact_from_obj(obj, path=path, line=lineno)


def apply_edits(facts: list[Fact], edits: list[dict]) -> list[Fact]:
    """The facts after an edit set (``edits.jsonl`` records): each listed fact gets its new object and text."""
    out = list(facts)
    for e in edits:
        old = out[e["fact_id"]]
        if (old.subject, old.relation, old.object) != (e["subject"], e["relation"], e["old_object"]):
            raise InputError(f"edit does not match fact {e['fact_id']}", field="old_object")
        out[e["fact_id"]] = Fact(
            old.subject, old.relation, e["object"], e["text"], old.namespace, old.source, old.aliases
        )
    return out
