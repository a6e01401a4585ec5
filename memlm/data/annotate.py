"""LMLM annotation: training text in which every fact carries its database lookup (seed 003).

The grammar is ``<|db_entity|> E<|db_relationship|> R<|db_return|> V<|db_end|>``, placed right before the
surface value, which the text then repeats: ``born in<call> Paris.`` where the plain text read ``born in
Paris.``. Removing the calls gives back the plain text exactly (:func:`strip_calls`), so both corpora describe
the same facts.

Why the mask: at inference the value ``V`` and ``<|db_end|>`` are inserted by the lookup, never generated, so
training on them would teach the model to answer from its weights — the thing LMLM exists to avoid.
:func:`annotate_ids` marks those tokens as never-targets. The mask is per token, so it survives any cut that
sequence packing makes through a call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memlm.tokenizer import DB_END, DB_ENTITY, DB_RELATIONSHIP, DB_RETURN

_CALL_RE = re.compile(
    re.escape(DB_ENTITY)
    + r"(?P<entity>.*?)"
    + re.escape(DB_RELATIONSHIP)
    + r"(?P<relation>.*?)"
    + re.escape(DB_RETURN)
    + r"(?P<value>.*?)"
    + re.escape(DB_END),
    re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class Call:
    """One lookup in annotated text; ``start``/``end`` are character offsets of the whole call."""

    entity: str
    relation: str
    value: str
    start: int
    end: int


def call_string(entity: str, relation: str, value: str) -> str:
    """The lookup call for one fact; each field is preceded by a space, as in LMLM's grammar."""
    return f"{DB_ENTITY} {entity}{DB_RELATIONSHIP} {relation}{DB_RETURN} {value}{DB_END}"


def render(template: str, subject: str, relation: str, obj: str) -> tuple[str, str]:
    """Fill a ``{s}``/``{o}`` template; return ``(plain, annotated)``.

    The call goes before the space that precedes the value, so the value keeps its leading space after
    ``<|db_end|>`` and tokenizes as it does in the plain text. ``{s}`` may appear several times, ``{o}`` once.
    """
    head, sep, tail = template.partition("{o}")
    if not sep:
        raise ValueError(f"template has no {{o}}: {template!r}")
    head, tail = head.replace("{s}", subject), tail.replace("{s}", subject)
    plain = head + obj + tail
    call = call_string(subject, relation, obj)
    if head.endswith(" "):
        return plain, head[:-1] + call + " " + obj + tail
    return plain, head + call + obj + tail


def parse_calls(text: str) -> list[Call]:
    """Every complete call in ``text``, in order (fields without their leading space)."""
    return [
        Call(
            m["entity"].removeprefix(" "),
            m["relation"].removeprefix(" "),
            m["value"].removeprefix(" "),
            m.start(),
            m.end(),
        )
        for m in _CALL_RE.finditer(text)
    ]


def strip_calls(text: str) -> str:
    """The plain text: every complete call removed, and any unfinished call at the end too."""
    text = _CALL_RE.sub("", text)
    cut = text.find(DB_ENTITY)
    return text if cut < 0 else text[:cut]


def annotate_ids(tokenizer, text_with_calls: str) -> tuple[list[int], list[bool]]:
    """Token ids of annotated text and a loss mask: ``mask[i]`` False = token i is never a training target.

    Masked: the value tokens ``V`` and ``<|db_end|>`` of every call. Everything else — the text, the
    entity, the relation, ``<|db_return|>`` (the model must learn to ask) and the repeated value after the
    call — stays a target. Each piece is encoded on its own; special tokens split the text before BPE in
    any case, so the ids equal ``tokenizer.encode(text_with_calls)``.
    """
    end_id = tokenizer.token_id(DB_END)
    ids: list[int] = []
    mask: list[bool] = []
    pos = 0
    for call in _CALL_RE.finditer(text_with_calls):
        # Up to and including <|db_return|>: trainable.
        ret_end = call.start("value")
        piece = tokenizer.encode(text_with_calls[pos:ret_end])
        ids += piece
        mask += [True] * len(piece)
        value = tokenizer.encode(call["value"])
        ids += value + [end_id]
        mask += [False] * (len(value) + 1)
        pos = call.end()
    rest = tokenizer.encode(text_with_calls[pos:])
    ids += rest
    mask += [True] * len(rest)
    return ids, mask
