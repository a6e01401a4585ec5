"""Streaming JSONL reading with errors that name the file and line (fields are the caller's to check)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memlm.errors import InputError


def iter_jsonl(path: str | os.PathLike, *, types: tuple[type, ...] = (dict,)) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, value)`` for each non-blank line of ``path``.

    Lines are read as bytes and decoded one by one, so invalid UTF-8 is reported at its exact line.
    A value whose type is not in ``types`` (by default: not a JSON object) is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"invalid UTF-8 at byte {err.start}", path=path, line=lineno) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(
                    f"invalid JSON ({err.msg} at column {err.colno})", path=path, line=lineno
                ) from None
            if not isinstance(value, types):
                expected = " or ".join(
                    {dict: "a JSON object", list: "a JSON array"}.get(t, t.__name__) for t in types
                )
                raise InputError(f"expected {expected}, got {type(value).__name__}", path=path, line=lineno)
            yield lineno, value
