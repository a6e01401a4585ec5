"""Read training documents from text and JSONL files.

Formats (chosen by file suffix):

- ``.txt``: one document per line. Blank lines are skipped. One-per-line keeps reading streamable and
  unambiguous; a document that needs line breaks goes in a ``.jsonl`` file instead.
- ``.jsonl``: one JSON object per line with a string field ``"text"``; other fields are ignored, blank
  lines are skipped. A bad line raises :class:`~memlm.errors.InputError` naming the file, line and field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from memlm.errors import InputError

SUFFIXES = (".txt", ".jsonl")


def iter_documents(path: str | os.PathLike) -> Iterator[str]:
    """Yield the documents of one ``.txt`` or ``.jsonl`` file, in file order."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise InputError(f"unsupported file type {path.suffix!r} (expected one of {SUFFIXES})", path=path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            yield line if path.suffix == ".txt" else _jsonl_text(line, path, lineno)


def iter_corpus(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Documents of several files, one file after the other."""
    for path in paths:
        yield from iter_documents(path)


def _jsonl_text(line: str, path: Path, lineno: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON ({err.msg} at column {err.colno})", path=path, line=lineno) from None
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=lineno)
    if "text" not in obj:
        raise InputError("missing", path=path, line=lineno, field="text")
    text = obj["text"]
    if not isinstance(text, str):
        raise InputError(
            f"expected a string, got {type(text).__name__}", path=path, line=lineno, field="text"
        )
    return text
