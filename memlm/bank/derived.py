"""Derived stores: what a bank folder holds besides its entries, and how purge and verify reach each one.

A derived store is a folder under ``<bank>/indexes/`` or ``<bank>/derived/`` with a ``manifest.json`` that
names its ``kind``. The code that writes a kind registers a handler for it::

    register("faiss", drop=drop_fn, verify=verify_fn)   # drop_fn(folder, ids); verify_fn(bank, folder)

``MemoryBank.delete(..., purge=True)`` calls ``drop`` on every store, which must rewrite the folder without
those entry ids (no byte of them left in any file). A store whose kind has no handler loaded in this process
is deleted instead: it is derived, so the next use rebuilds it. This keeps the bank below the layers that
write derived data (indexes, memory designs): they register with the bank, the bank imports none of them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from memlm.bank.store import MemoryBank

ROOTS = ("indexes", "derived")


@dataclass(frozen=True)
class Handler:
    drop: Callable[[Path, np.ndarray], None]  # rewrite the folder without these entry ids
    verify: Callable[[MemoryBank, Path], list[str]] | None = None  # problems found ([] = healthy)


_HANDLERS: dict[str, Handler] = {}


def register(kind: str, *, drop: Callable, verify: Callable | None = None) -> None:
    _HANDLERS[kind] = Handler(drop, verify)


def stores(bank_path: Path) -> Iterator[tuple[Path, str | None]]:
    """(folder, kind) of every derived store; kind None when the manifest is missing or unreadable."""
    for root in ROOTS:
        base = bank_path / root
        for folder in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
            if folder.name.startswith("."):  # an atomic write in progress (memlm.utils.io)
                continue
            try:
                kind = json.loads((folder / "manifest.json").read_text())["kind"]
            except (OSError, ValueError, KeyError, TypeError):
                kind = None
            yield folder, kind


def drop_entries(bank_path: Path, ids: np.ndarray) -> list[str]:
    """Rewrite every derived store without ``ids``; returns what was done, one line per store."""
    done = []
    for folder, kind in stores(bank_path):
        handler = _HANDLERS.get(kind)
        if handler is not None:
            try:
                handler.drop(folder, ids)
                done.append(f"{folder}: rewritten without {len(ids)} entries")
                continue
            except Exception as e:  # a damaged store must not keep purged data: drop it whole instead
                done.append(f"{folder}: unreadable ({type(e).__name__}: {e}); removed")
        else:
            done.append(f"{folder}: removed (kind {kind!r} not loaded; rebuilt on next use)")
        shutil.rmtree(folder)
    return done


def verify_stores(bank: MemoryBank) -> list[str]:
    problems = []
    for folder, kind in stores(bank.path):
        handler = _HANDLERS.get(kind)
        if kind is None:
            problems.append(f"{folder}: derived folder without a readable manifest.json")
        elif handler is not None and handler.verify is not None:
            problems += handler.verify(bank, folder)
    return problems
