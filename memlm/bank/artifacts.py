"""Per-entry artifacts of a memory design (token ids, Memory³ key/values), kept in the bank folder.

>>> store = ArtifactStore(bank, "memory3-kv", fingerprint=f"gpt:{checkpoint_sha}")
>>> store.put(entry, {"k": k_array, "v": v_array})      # entry: a bank Entry
>>> store.get(entry)                                     # the arrays, or None if missing or stale

One folder ``<bank>/derived/<name>/`` per store: ``manifest.json`` (kind "artifacts", the fingerprint) and
``artifacts.sqlite`` (entry id, content hash, safetensors bytes). An artifact is valid only for the entry
content and the model checkpoint it was computed from (Memory³, Remark 9): ``get`` checks the content hash,
and a store opened with another fingerprint starts empty. It is a derived store (memlm.bank.derived), so
``delete(purge=True)`` erases its rows too: SQLite with ``secure_delete`` and a truncating WAL checkpoint.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from memlm.bank import derived

if TYPE_CHECKING:
    from memlm.bank.entry import Entry
    from memlm.bank.store import MemoryBank

KIND = "artifacts"
_SCHEMA = "CREATE TABLE IF NOT EXISTS artifacts(entry_id INTEGER PRIMARY KEY, content_hash TEXT NOT NULL, data BLOB NOT NULL)"


def _connect(folder: Path) -> sqlite3.Connection:
    con = sqlite3.connect(folder / "artifacts.sqlite", isolation_level=None, timeout=30.0)
    con.execute("PRAGMA secure_delete=ON")  # a dropped row is zeroed, not just unlinked
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(_SCHEMA)
    return con


class ArtifactStore:
    """Named arrays per entry, keyed by entry id + content hash, for one model fingerprint."""

    def __init__(self, bank: MemoryBank, name: str, *, fingerprint: str) -> None:
        self.folder = bank.path / "derived" / name
        manifest = self.folder / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") != fingerprint:
            # another checkpoint's artifacts are invalid for this one: start over rather than mix
            import shutil

            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not manifest.exists():
            manifest.write_text(json.dumps({"kind": KIND, "fingerprint": fingerprint}))
        self.fingerprint = fingerprint
        self._con = _connect(self.folder)

    def put(self, entry: Entry, arrays: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save

        blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        self._con.execute(
            "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?)", (entry.id, entry.content_hash, blob)
        )

    def get(self, entry: Entry) -> dict[str, np.ndarray] | None:
        from safetensors.numpy import load

        row = self._con.execute(
            "SELECT data FROM artifacts WHERE entry_id=? AND content_hash=?", (entry.id, entry.content_hash)
        ).fetchone()
        return None if row is None else load(row[0])

    def __len__(self) -> int:
        return self._con.execute("SELECT COUNT(*) FROM artifacts").fetchone()[0]

    def close(self) -> None:
        self._con.close()


def drop(folder: Path, ids: np.ndarray) -> None:
    """Erase the artifacts of these entries from the store's files (derived-store handler)."""
    con = _connect(folder)
    try:
        ids = [int(i) for i in ids]
        for c in range(0, len(ids), 900):
            part = ids[c : c + 900]
            con.execute(f"DELETE FROM artifacts WHERE entry_id IN ({','.join('?' * len(part))})", part)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()


derived.register(KIND, drop=drop)
