"""The ``facts.jsonl`` format every knowledge source writes and the bank imports.

One JSON object per line, keys sorted::

    {"subject": str, "relation": str, "object": str, "text": str,
     "namespace": str?, "source": str?, "aliases": [str]?}

``text`` is one human-readable sentence stating the fact. A fact's ``fact_id`` is its 0-based line index;
QA, edit and deletion records refer to facts by it (and by ``(subject, relation)``, which is unique).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from memlm.errors import InputError
from memlm.utils.jsonl import iter_jsonl

_ENCODER = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True
)  # one encoder: cheaper than json.dumps per line
REQUIRED = ("subject", "relation", "object", "text")
OPTIONAL_STR = ("namespace", "source")


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
    """Validate one decoded JSON value as a fact; errors name the path, line and field."""
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
    for key in REQUIRED:
        if key not in obj:
            raise InputError("missing", path=path, line=line, field=key)
    for key in REQUIRED + OPTIONAL_STR:
        if key in obj and not isinstance(obj[key], str):
            raise InputError(
                f"expected a string, got {type(obj[key]).__name__}", path=path, line=line, field=key
            )
    for key in ("subject", "relation", "text"):
        if not obj[key].strip():
            raise InputError("must not be empty", path=path, line=line, field=key)
    aliases = obj.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise InputError("expected a list of strings", path=path, line=line, field="aliases")
    return Fact(
        obj["subject"],
        obj["relation"],
        obj["object"],
        obj["text"],
        obj.get("namespace"),
        obj.get("source"),
        tuple(aliases),
    )


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
