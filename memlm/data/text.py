"""Read training documents from text and JSONL files.

Formats (chosen by file suffix):

- ``.txt``: one document per line. Blank lines are skipped. One-per-line keeps reading streamable and
  unambiguous; a document that needs line breaks goes in a ``.jsonl`` file instead.
- ``.jsonl``: one JSON object per line with a string field ``"text"``; other fields are ignored, blank
  lines are skipped. A bad line raises :class:`~memlm.errors.InputError` naming the file, line and field.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from memlm.errors import InputError
from memlm.utils.jsonl import iter_jsonl

SUFFIXES = (".txt", ".jsonl")


def iter_documents(path: str | os.PathLike) -> Iterator[str]:
    """Yield the documents of one ``.txt`` or ``.jsonl`` file, in file order."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise InputError(f"unsupported file type {path.suffix!r} (expected one of {SUFFIXES})", path=path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    if path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            yield _text_field(obj, path, lineno)
        return
    with path.open(encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n").rstrip("\r")
            if line.strip():
                yield line


def iter_corpus(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Documents of several files, one file after the other."""
    for path in paths:
        yield from iter_documents(path)


def _text_field(obj: dict, path: Path, lineno: int) -> str:
    if "text" not in obj:
        raise InputError("missing", path=path, line=lineno, field="text")
    text = obj["text"]
    if not isinstance(text, str):
        raise InputError(
            f"expected a string, got {type(text).__name__}", path=path, line=lineno, field="text"
        )
    return text
