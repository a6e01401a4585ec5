"""Training documents one per sample, read lazily by byte offset (the layout memory designs train on).

Packed windows (:mod:`memlm.data.pack`) cut documents anywhere, which suits a dense model. A model that reads
memory needs each sample to be one document: RAG places the entries retrieved for *that* document before it,
Memory³ reads per chunk of it. A :class:`DocumentDataset` keeps only an index of where each selected document
starts (``offsets.npy``: file number, byte offset), built once and cached like a packed folder, so a corpus
far larger than RAM costs 16 bytes per document.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from memlm.data.pack import source_signature
from memlm.data.text import SUFFIXES, _text_field
from memlm.errors import InputError
from memlm.utils.io import atomic_path, write_json

FORMAT = 1


def _scan(path: Path, file_no: int, select: Callable[[str], bool] | None) -> list[tuple[int, int]]:
    """(file_no, byte offset) of every document line of ``path`` that ``select`` keeps."""
    if path.suffix not in SUFFIXES:
        raise InputError(f"unsupported file type {path.suffix!r} (expected one of {SUFFIXES})", path=path)
    out = []
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            text = _decode(raw, path, lineno)
            if text is not None and (select is None or select(text)):
                out.append((file_no, offset))
            offset += len(raw)
    return out


def _decode(raw: bytes, path: Path, lineno: int | None) -> str | None:
    """The document on one raw line, None for a blank line; errors name the file, line and field."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"invalid UTF-8 at byte {err.start}", path=path, line=lineno) from None
    if not line.strip():
        return None
    if path.suffix == ".txt":
        return line.rstrip("\n").rstrip("\r")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON ({err.msg} at column {err.colno})", path=path, line=lineno) from None
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=lineno)
    return _text_field(obj, path, lineno)


def build_document_index(
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    select: Callable[[str], bool] | None = None,
    tag: str = "",
) -> Path:
    """Write ``out_dir/offsets.npy`` + ``meta.json`` unless an up-to-date index is there (same key)."""
    out_dir = Path(out_dir)
    key = {"format": FORMAT, "sources": source_signature(files), "tag": tag}
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if all(old.get(k) == v for k, v in key.items()):
            return out_dir
    rows: list[tuple[int, int]] = []
    for i, f in enumerate(files):
        rows += _scan(Path(f), i, select)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        np.save(tmp / "offsets.npy", np.asarray(rows, dtype=np.int64).reshape(-1, 2))
        write_json(
            tmp / "meta.json", {**key, "files": [str(Path(f).resolve()) for f in files], "n_docs": len(rows)}
        )
    return out_dir


class DocumentDataset(torch.utils.data.Dataset):
    """Item ``i`` is the text of the ``i``-th selected document (a ``str``)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise InputError("not a document index folder (meta.json missing)", path=self.directory)
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.files = [Path(f) for f in self.meta["files"]]
        self.offsets = np.load(self.directory / "offsets.npy")
        if len(self.offsets) == 0:
            raise InputError("no documents to train on", path=self.directory)
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self.offsets):
            raise IndexError(i)
        file_no, offset = (int(v) for v in self.offsets[i])
        f = self._handles.get(file_no)
        if f is None:
            f = self._handles[file_no] = self.files[file_no].open("rb")
        f.seek(offset)
        text = _decode(f.readline(), self.files[file_no], None)
        if text is None:
            raise InputError(f"document {i} is gone (file changed since indexing)", path=self.files[file_no])
        return text

    def texts(self, indices: Sequence[int]) -> list[str]:
        return [self[int(i)] for i in indices]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}
