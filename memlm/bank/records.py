"""Validation of user-supplied entries and facts (keyword arguments or one JSONL object), and JSONL streaming.

The one place for the field rules of a fact or entry: the bank's import and ``memlm.data.facts`` (what every
knowledge source writes) both call :func:`validate`, so a file the data tools accept the bank accepts too.
Every problem becomes an :class:`~memlm.errors.InputError` naming the file, the line and the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from memlm.bank.entry import DEFAULT_NAMESPACE
from memlm.errors import InputError
from memlm.utils.jsonl import iter_jsonl

_STR_FIELDS = ("text", "subject", "relation", "object", "namespace", "source")
KNOWN_FIELDS = {*_STR_FIELDS, "frozen", "aliases", "id"}


class ValidRecord(dict):
    """A record that passed :func:`validate` (so bulk import does not check it twice)."""


def validate(
    rec: dict,
    *,
    path: str | os.PathLike | None = None,
    line: int | None = None,
    require: tuple[str, ...] = (),
) -> ValidRecord:
    """Check one record and fill defaults; returns a new dict with every known field.

    ``text`` defaults to "subject relation object" when only a triple is given; ``require`` names fields that
    must be present (a fact needs its whole triple and its text). Unknown keys are an error (a typo such as
    "subjet" would otherwise be silently lost); so are an empty subject, relation or text.
    """
    if not isinstance(rec, dict):
        raise InputError(f"expected a JSON object, got {type(rec).__name__}", path=path, line=line)
    unknown = sorted(set(rec) - KNOWN_FIELDS)
    if unknown:
        raise InputError(
            f"unknown field (known: {', '.join(sorted(KNOWN_FIELDS))})",
            path=path,
            line=line,
            field=unknown[0],
        )
    out = ValidRecord()
    for f in _STR_FIELDS:
        v = rec.get(f)
        if v is not None and not isinstance(v, str):
            raise InputError(f"expected a string, got {type(v).__name__}", path=path, line=line, field=f)
        out[f] = v
    for f in require:
        if out.get(f) is None:
            raise InputError("missing", path=path, line=line, field=f)
    for f in ("subject", "relation"):
        if out[f] is not None and not out[f].strip():
            raise InputError("must not be empty", path=path, line=line, field=f)
    triple = [out["subject"], out["relation"], out["object"]]
    if any(t is not None for t in triple) and (out["subject"] is None or out["relation"] is None):
        missing = "subject" if out["subject"] is None else "relation"
        raise InputError("a triple needs both subject and relation", path=path, line=line, field=missing)
    if out["text"] is None:
        if out["subject"] is None or out["object"] is None:
            raise InputError(
                "missing (give text, or subject + relation + object)", path=path, line=line, field="text"
            )
        out["text"] = f"{out['subject']} {out['relation']} {out['object']}"
    if not out["text"].strip():
        raise InputError("empty text", path=path, line=line, field="text")
    out["namespace"] = out["namespace"] or DEFAULT_NAMESPACE
    frozen = rec.get("frozen", False)
    if not isinstance(frozen, bool):
        raise InputError(f"expected true or false, got {frozen!r}", path=path, line=line, field="frozen")
    out["frozen"] = frozen
    aliases = rec.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise InputError("expected a list of strings", path=path, line=line, field="aliases")
    if aliases and out["relation"] is None:
        raise InputError(
            "aliases name the subject, so the entry needs a triple", path=path, line=line, field="aliases"
        )
    out["aliases"] = tuple(aliases)
    eid = rec.get("id")
    # bool is an int in Python; an id of `true` is a data error, not id 1.
    if eid is not None and (not isinstance(eid, int) or isinstance(eid, bool) or eid < 0 or eid >= 2**63):
        raise InputError(
            f"expected a non-negative 64-bit integer, got {eid!r}", path=path, line=line, field="id"
        )
    out["id"] = eid
    return out


def read_jsonl(path: str | os.PathLike, *, namespace: str | None = None) -> Iterator[dict]:
    """Stream validated records from a facts JSONL file (blank lines skipped).

    ``namespace`` fills records that have none. Raises InputError at the first bad line, so a
    caller inside a transaction rolls back and nothing half-imported remains.
    """
    for lineno, obj in iter_jsonl(path):
        if namespace is not None and not obj.get("namespace"):
            obj["namespace"] = namespace
        yield validate(obj, path=path, line=lineno)
