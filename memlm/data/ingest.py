"""Ingest a user's knowledge: JSONL facts or triples, and plain text / markdown chunked into entries.

Input, by file suffix (folders are searched recursively, in sorted order):

- ``.jsonl``: one fact per line, either an object ``{"subject", "relation", "object"}`` with optional
  ``text`` / ``namespace`` / ``source`` / ``aliases``, or a triple ``["subject", "relation", "object"]``.
  A fact without ``text`` gets the sentence "The <relation> of <subject> is <object>.".
- ``.txt`` / ``.md``: split into chunks of at most ``chunk_size`` characters, cut at whitespace, with
  ``overlap`` characters shared by neighbours so a sentence cut by one chunk is whole in the next.

Output folder: ``facts.jsonl`` (format: :mod:`memlm.data.facts`), ``entries.jsonl`` (text chunks:
``{"text", "source", "namespace"}`` — no triple), ``corpus/train.jsonl`` (every fact sentence and chunk,
one document per line), ``corpus/train_lmlm.jsonl`` (the same, with a lookup call before each fact's object
where the sentence contains it) and ``meta.json``.

Why everything is checked before anything is kept: an import that stops halfway leaves a bank that is
neither the old nor the new knowledge. Any bad input — malformed JSON, a missing field, a wrong type,
invalid UTF-8, an empty file — raises :class:`InputError` naming the file, line and field, and the output
folder is left as it was.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from memlm.data.annotate import call_string
from memlm.data.facts import Fact, fact_from_obj
from memlm.errors import InputError
from memlm.utils.io import atomic_path
from memlm.utils.jsonl import iter_jsonl

FACT_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class IngestConfig:
    chunk_size: int = 512  # characters per chunk (a small model's context holds a few of these)
    overlap: int = 64  # characters repeated between consecutive chunks
    namespace: str = "default"

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if not 0 <= self.overlap < self.chunk_size:
            raise ValueError("overlap must be >= 0 and smaller than chunk_size")


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    start: int  # character offsets in the file's text
    end: int


def chunk_text(text: str, *, chunk_size: int, overlap: int) -> list[Chunk]:
    """Cut ``text`` into chunks of <= chunk_size characters at whitespace (hard cut inside a longer word);
    each chunk starts at the first word that begins at or after ``previous end - overlap``."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    chunks: list[Chunk] = []
    i = 0
    while i < len(words):
        start = words[i][0]
        j = i
        while j + 1 < len(words) and words[j + 1][1] - start <= chunk_size:
            j += 1
        end = min(words[j][1], start + chunk_size)
        chunks.append(Chunk(text[start:end], start, end))
        if end < words[j][1]:  # a word longer than chunk_size: continue inside it
            words[j] = (end, words[j][1])
            i = j
            continue
        nxt = j + 1
        back = j
        while back > i and words[back][0] >= end - overlap:
            back -= 1
        if overlap and back + 1 <= j and back + 1 > i:
            nxt = back + 1
        i = nxt
    return chunks


def default_text(subject: str, relation: str, obj: str) -> str:
    return f"The {relation.replace('_', ' ')} of {subject} is {obj}."


def annotate_fact(fact: Fact) -> str:
    """The fact's sentence with a lookup call before the last occurrence of its object (unchanged if absent)."""
    k = fact.text.rfind(fact.object) if fact.object else -1
    if k < 0:
        return fact.text
    call = call_string(fact.subject, fact.relation, fact.object)
    head = fact.text[:k]
    if head.endswith(" "):
        return head[:-1] + call + " " + fact.text[k:]
    return head + call + fact.text[k:]


def _lines(path: Path):
    """(line number, decoded line) of a file; invalid UTF-8 names its line; an empty file is an error."""
    data = path.read_bytes()
    if not data.strip():
        raise InputError("empty file", path=path)
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            yield lineno, raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as err:
            raise InputError(f"invalid UTF-8 at byte {err.start}", path=path, line=lineno) from None


def read_facts(path: Path, namespace: str) -> list[Fact]:
    if not path.read_bytes().strip():
        raise InputError("empty file", path=path)
    facts = []
    for lineno, obj in iter_jsonl(path, types=(dict, list)):
        if isinstance(obj, list):
            if len(obj) != 3:
                raise InputError(f"a triple needs 3 items, got {len(obj)}", path=path, line=lineno)
            obj = dict(zip(("subject", "relation", "object"), obj))
        if isinstance(obj, dict) and "text" not in obj:
            fact_from_obj({**obj, "text": "-"}, path=path, line=lineno)  # the triple's own errors first
            obj = {**obj, "text": default_text(obj["subject"], obj["relation"], obj["object"])}
        fact = fact_from_obj(obj, path=path, line=lineno)
        if "\n" in fact.subject:
            raise InputError("must be one line", path=path, line=lineno, field="subject")
        if fact.namespace is None or fact.source is None:
            fact = Fact(
                fact.subject,
                fact.relation,
                fact.object,
                fact.text,
                fact.namespace or namespace,
                fact.source or f"{path}:{lineno}",
                fact.aliases,
            )
        facts.append(fact)
    return facts


def read_chunks(path: Path, config: IngestConfig) -> list[dict]:
    text = "\n".join(line for _, line in _lines(path))
    return [
        {"text": c.text, "source": f"{path}:{c.start}-{c.end}", "namespace": config.namespace}
        for c in chunk_text(text, chunk_size=config.chunk_size, overlap=config.overlap)
    ]


def input_files(inputs: list[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p for p in item.rglob("*") if p.is_file() and p.suffix in FACT_SUFFIXES + TEXT_SUFFIXES
            )
            if not found:
                raise InputError("no .jsonl, .txt or .md files in this folder", path=item)
            files += found
        elif not item.is_file():
            raise InputError("file not found", path=item)
        elif item.suffix not in FACT_SUFFIXES + TEXT_SUFFIXES:
            raise InputError(f"unsupported file type {item.suffix!r} (use .jsonl, .txt or .md)", path=item)
        else:
            files.append(item)
    return files


def ingest(
    inputs: list[str | os.PathLike], out: str | os.PathLike, config: IngestConfig | None = None
) -> dict:
    """Read and check every input, then write the output folder in one atomic step; return meta.json's content."""
    config = config or IngestConfig()
    facts: list[Fact] = []
    entries: list[dict] = []
    files = input_files(list(inputs))
    for path in files:
        if path.suffix in FACT_SUFFIXES:
            facts += read_facts(path, config.namespace)
        else:
            entries += read_chunks(path, config)
    meta = {
        "config": asdict(config),
        "inputs": [str(p) for p in files],
        "counts": {"facts": len(facts), "entries": len(entries)},
    }
    with atomic_path(out) as tmp:
        (tmp / "corpus").mkdir(parents=True)
        dump = lambda obj: json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n"  # noqa: E731
        (tmp / "facts.jsonl").write_text("".join(f.to_json() + "\n" for f in facts), encoding="utf-8")
        (tmp / "entries.jsonl").write_text("".join(dump(e) for e in entries), encoding="utf-8")
        docs = [f.text for f in facts] + [e["text"] for e in entries]
        lmlm = [annotate_fact(f) for f in facts] + [e["text"] for e in entries]
        (tmp / "corpus/train.jsonl").write_text("".join(dump({"text": d}) for d in docs), encoding="utf-8")
        (tmp / "corpus/train_lmlm.jsonl").write_text(
            "".join(dump({"text": d}) for d in lmlm), encoding="utf-8"
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta
