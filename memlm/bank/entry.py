"""One memory entry, and the two derived strings the bank indexes it by (content hash, lookup key)."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import asdict, dataclass, field

DEFAULT_NAMESPACE = "default"

# The fields a user may set; id, times, version and hash are the bank's.
CONTENT_FIELDS = ("text", "subject", "relation", "object", "namespace", "frozen", "source", "aliases")


@dataclass(frozen=True)
class Entry:
    """A bank entry as stored: human-readable ``text``, an optional (subject, relation, object) triple.

    ``version`` counts this entry's edits (1 = as added); ``content_hash`` keys every derived vector,
    so changing any content field invalidates exactly this entry's cached vectors.
    """

    id: int
    text: str
    subject: str | None = None
    relation: str | None = None
    object: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    frozen: bool = False
    source: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    created: float = 0.0
    updated: float = 0.0
    version: int = 1
    content_hash: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        return d

    def content(self) -> dict:
        """The user-settable fields (what export writes and rollback restores)."""
        return {
            k: (list(v) if k == "aliases" else v) for k, v in self.to_dict().items() if k in CONTENT_FIELDS
        }


def normalise(s: str) -> str:
    """Case- and whitespace-insensitive form used for exact subject/relation/alias lookups (LMLM)."""
    s = unicodedata.normalize("NFKC", s).casefold()
    return " ".join(s.split())


def lookup_key(subject: str | None, relation: str | None) -> str | None:
    """``normalise(subject) \\x1f normalise(relation)``; None for entries without a triple."""
    if subject is None or relation is None:
        return None
    return normalise(subject) + "\x1f" + normalise(relation)


def content_hash(text: str, subject: str | None, relation: str | None, obj: str | None) -> str:
    """sha1 over what an encoder may read; namespace/frozen/source changes keep cached vectors."""
    payload = json.dumps([text, subject, relation, obj], ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()
