"""Errors a user can act on. The CLI prints these as one line, without a traceback."""

from __future__ import annotations

import os


class MemlmError(Exception):
    """Base class for every error memlm raises about user input, files or configuration."""


class InputError(MemlmError, ValueError):
    """Bad input data: names the file, the line and the field so the user can fix it.

    >>> str(InputError("expected a string", path="facts.jsonl", line=3, field="subject"))
    "facts.jsonl:3: field 'subject': expected a string"
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path, self.line, self.field, self.message = path, line, field, message
        where = ""
        if path is not None:
            where = f"{os.fspath(path)}:" + (f"{line}:" if line is not None else "") + " "
        elif line is not None:
            where = f"line {line}: "
        what = f"field '{field}': " if field is not None else ""
        super().__init__(f"{where}{what}{message}")


class CheckpointError(MemlmError):
    """A checkpoint folder that is missing files, corrupt, or from another architecture."""


class ConfigError(MemlmError, ValueError):
    """A config file or override that does not match the config dataclasses."""
