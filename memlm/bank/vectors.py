"""Cached entry vectors, one float32 file per encoder fingerprint, mapped by SQLite.

Each encoder (or model checkpoint) has a fingerprint; its vectors live in ``vectors/<sha1(fp)[:16]>.f32``
(raw float32 rows, memory-mapped) and the table ``vectors(fingerprint, entry_id, row, content_hash)`` says
which row holds which entry, computed from which content. So:

- an edit changes the entry's content hash: only that entry is re-encoded by the next :meth:`VectorCache.sync`;
- a new encoder or checkpoint has a new fingerprint: none of the old vectors are used for it (Memory³, Remark 9);
- a deleted entry's map row is removed in the delete transaction and its file row zeroed after commit.

Rows are only appended (a crash mid-sync leaves unmapped rows at the end, which are ignored).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from memlm.errors import InputError

if TYPE_CHECKING:
    from memlm.bank.store import MemoryBank
    from memlm.encode.base import Encoder


# What of an entry is encoded, as an SQL expression over the entries table (alias e):
# - text: the human-readable text (what a reader would search with words of the answer);
# - about: what the entry is about — "subject relation" for a triple ("Ada L. Byron birth city"), the text
#   otherwise. A question names its subject and relation but not the answer, so the object in a key only adds
#   noise: on bios, MiniLM's top-1 on held-out questions is 0.65 by text and 0.97 by "about".
KEYS = {
    "text": "e.text",
    "about": "CASE WHEN e.subject IS NOT NULL AND e.relation IS NOT NULL "
    "THEN e.subject || ' ' || replace(e.relation, '_', ' ') ELSE e.text END",
}


def _files(bank_path: Path, fingerprint: str) -> tuple[Path, Path]:
    slug = hashlib.sha1(fingerprint.encode()).hexdigest()[:16]
    d = bank_path / "vectors"
    return d / f"{slug}.f32", d / f"{slug}.json"


def _dim_of(bank_path: Path, fingerprint: str) -> int:
    _, meta = _files(bank_path, fingerprint)
    return int(json.loads(meta.read_text())["dim"])


def zero_rows(bank_path: Path, rows: Sequence[tuple[str, int]]) -> None:
    """Overwrite the given (fingerprint, row) vectors with zeros (called after a delete commits)."""
    by_fp: dict[str, list[int]] = {}
    for fp, row in rows:
        by_fp.setdefault(fp, []).append(row)
    for fp, rs in by_fp.items():
        data, _ = _files(bank_path, fp)
        if not data.exists():
            continue
        dim = _dim_of(bank_path, fp)
        zeros = bytes(4 * dim)
        with data.open("r+b") as f:
            for r in sorted(rs):
                f.seek(r * 4 * dim)
                f.write(zeros)


class VectorCache:
    """The vectors of a bank's entries under one encoder.

    >>> cache = VectorCache(bank, HashingEncoder(dim=64)); cache.sync()   # encodes what is missing or stale
    >>> cache.get([3, 5]).shape                                              # (2, 64) float32
    """

    def __init__(self, bank: MemoryBank, encoder: Encoder, *, key: str = "text") -> None:
        if key not in KEYS:
            raise InputError(f"unknown vector key {key!r} (known: {', '.join(KEYS)})", field="key")
        self.bank, self.encoder, self.key = bank, encoder, key
        # The key is part of what the vectors are a function of, so it is part of their fingerprint.
        fp = encoder.fingerprint if key == "text" else f"{encoder.fingerprint}|key={key}"
        self.fingerprint, self.dim = fp, int(encoder.dim)
        self.data_path, meta_path = _files(bank.path, self.fingerprint)
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta["dim"] != self.dim:
                raise InputError(
                    f"{meta_path}: cached vectors have dim {meta['dim']}, encoder says {self.dim}"
                )
        elif not bank.readonly:
            meta_path.parent.mkdir(exist_ok=True)
            meta_path.write_text(json.dumps({"fingerprint": self.fingerprint, "dim": self.dim}))
        self._mm: np.memmap | None = None

    # ------------------------------------------------------------------ reading
    def _rows_on_disk(self) -> int:
        return self.data_path.stat().st_size // (4 * self.dim) if self.data_path.exists() else 0

    def _array(self) -> np.ndarray:
        n = self._rows_on_disk()
        if self._mm is None or self._mm.shape[0] != n:
            self._mm = (
                np.memmap(self.data_path, dtype=np.float32, mode="r", shape=(n, self.dim)) if n else None
            )
        return self._mm if self._mm is not None else np.zeros((0, self.dim), np.float32)

    def get(self, ids: Sequence[int]) -> np.ndarray:
        """(N, dim) float32 vectors of these entries, in order; raises if one is not synced."""
        ids = [int(i) for i in ids]
        rows: dict[int, int] = {}
        con = self.bank.connection
        for c in range(0, len(ids), 900):
            part = ids[c : c + 900]
            q = (
                "SELECT v.entry_id, v.row FROM vectors v JOIN entries e ON e.id = v.entry_id "
                f"WHERE v.fingerprint=? AND v.content_hash = e.content_hash AND v.entry_id IN ({','.join('?' * len(part))})"
            )
            rows.update(con.execute(q, [self.fingerprint, *part]).fetchall())
        missing = [i for i in ids if i not in rows]
        if missing:
            raise InputError(f"no up-to-date vector for entry {missing[0]} (call sync())", field="id")
        arr = self._array()
        return np.ascontiguousarray(arr[[rows[i] for i in ids]], dtype=np.float32).reshape(len(ids), self.dim)

    def fetch(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(ids, vectors, namespaces) of those ``ids`` that exist and have an up-to-date vector (others skipped)."""
        ids = [int(i) for i in ids]
        found: list[tuple[int, str, int]] = []
        con = self.bank.connection
        for c in range(0, len(ids), 900):
            part = ids[c : c + 900]
            found += con.execute(
                "SELECT e.id, e.namespace, v.row FROM entries e JOIN vectors v ON v.entry_id = e.id "
                f"WHERE v.fingerprint=? AND v.content_hash = e.content_hash AND e.id IN ({','.join('?' * len(part))})",
                [self.fingerprint, *part],
            ).fetchall()
        arr = self._array()
        vecs = np.asarray(arr[[r[2] for r in found]], dtype=np.float32).reshape(len(found), self.dim)
        return np.array([r[0] for r in found], np.int64), vecs, [r[1] for r in found]

    def iter_all(
        self, namespaces: Sequence[str] | None = None, *, batch_size: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """Yield (ids (B,) int64, vectors (B, dim) float32, namespaces) for every synced entry, in id order."""
        with self.bank.snapshot() as con:
            where, args = "", [self.fingerprint]
            if namespaces is not None:
                where = f"AND e.namespace IN ({','.join('?' * len(namespaces))})"
                args += list(namespaces)
            cur = con.execute(
                "SELECT e.id, e.namespace, v.row FROM entries e JOIN vectors v ON v.entry_id = e.id "
                f"WHERE v.fingerprint=? AND v.content_hash = e.content_hash {where} ORDER BY e.id",
                args,
            )
            arr = self._array()
            while batch := cur.fetchmany(batch_size):
                ids = np.fromiter((r[0] for r in batch), np.int64, len(batch))
                rows = np.fromiter((r[2] for r in batch), np.int64, len(batch))
                yield ids, np.asarray(arr[rows], dtype=np.float32), [r[1] for r in batch]

    def count(self) -> int:
        q = "SELECT COUNT(*) FROM vectors v JOIN entries e ON e.id=v.entry_id WHERE v.fingerprint=? AND v.content_hash=e.content_hash"
        return self.bank.connection.execute(q, (self.fingerprint,)).fetchone()[0]

    # ------------------------------------------------------------------ writing
    def sync(
        self, ids: Sequence[int] | None = None, *, batch_size: int = 2048, progress: bool = False
    ) -> int:
        """Encode every entry (or only these ``ids``) whose vector is missing or was made from older content.

        Returns how many were encoded. With ``ids`` the cost is O(len(ids)), which keeps an edit's
        refresh independent of the bank size.
        """
        con = self.bank.connection
        stale = "(v.entry_id IS NULL OR v.content_hash != e.content_hash)"
        join = "FROM entries e LEFT JOIN vectors v ON v.fingerprint=? AND v.entry_id=e.id"
        if ids is not None:
            ids = [int(i) for i in ids]
            pages = []
            for c in range(0, len(ids), 900):
                part = ids[c : c + 900]
                q = f"SELECT e.id, {KEYS[self.key]}, e.content_hash {join} WHERE e.id IN ({','.join('?' * len(part))}) AND {stale}"
                pages.append(con.execute(q, [self.fingerprint, *part]).fetchall())
            for page in pages:
                if page:
                    self._append(page, self._encode(page))
            return sum(len(p) for p in pages)
        total = con.execute(f"SELECT COUNT(*) {join} WHERE {stale}", (self.fingerprint,)).fetchone()[0]
        if total == 0:
            return 0
        bar = tqdm(
            total=total, desc=f"encode ({self.fingerprint[:24]})", unit=" entries", disable=not progress
        )
        done, last = 0, -1
        while True:
            # keyset pages: each page is a fresh query, so no read cursor stays open across our commits.
            page = con.execute(
                f"SELECT e.id, {KEYS[self.key]}, e.content_hash {join} WHERE e.id > ? AND {stale} "
                "ORDER BY e.id LIMIT ?",
                (self.fingerprint, last, batch_size),
            ).fetchall()
            if not page:
                break
            last = page[-1][0]
            self._append(page, self._encode(page))
            done += len(page)
            bar.update(len(page))
        bar.close()
        return done

    def _encode(self, page: list[tuple]) -> np.ndarray:
        vecs = np.asarray(self.encoder.encode([r[1] for r in page]), dtype=np.float32)
        if vecs.shape != (len(page), self.dim):
            raise InputError(f"encoder returned shape {vecs.shape}, expected ({len(page)}, {self.dim})")
        return vecs

    def _append(self, page: list[tuple], vecs: np.ndarray) -> None:
        con = self.bank.connection
        with self.bank.write_transaction():  # holds the write lock, so rows are not handed out twice
            start = self._rows_on_disk()
            self.data_path.parent.mkdir(exist_ok=True)
            with self.data_path.open("ab") as f:
                f.write(np.ascontiguousarray(vecs).tobytes())
            marks = ",".join("?" * len(page))
            stale = con.execute(
                f"SELECT fingerprint, row FROM vectors WHERE fingerprint=? AND entry_id IN ({marks})",
                [self.fingerprint, *(r[0] for r in page)],
            ).fetchall()
            # Only map rows whose entry still has the content we encoded (an edit may have raced us).
            con.executemany(
                "INSERT OR REPLACE INTO vectors SELECT ?, id, ?, content_hash FROM entries WHERE id=? AND content_hash=?",
                [(self.fingerprint, start + j, r[0], r[2]) for j, r in enumerate(page)],
            )
        zero_rows(self.bank.path, stale)


def verify_vectors(bank: MemoryBank) -> list[str]:
    """Vector files against their maps: sizes, row bounds, duplicate rows, unmapped rows that are not zero."""
    problems: list[str] = []
    con = bank.connection
    fps = [r[0] for r in con.execute("SELECT DISTINCT fingerprint FROM vectors")]
    vec_dir = bank.path / "vectors"
    for meta_path in sorted(vec_dir.glob("*.json")) if vec_dir.exists() else []:
        try:
            meta = json.loads(meta_path.read_text())
            fp, dim = meta["fingerprint"], int(meta["dim"])
        except (ValueError, KeyError) as e:
            problems.append(f"{meta_path}: unreadable ({e})")
            continue
        data, _ = _files(bank.path, fp)
        size = data.stat().st_size if data.exists() else 0
        if size % (4 * dim):
            problems.append(f"{data}: size {size} is not a whole number of {dim}-d float32 rows")
        n = size // (4 * dim)
        rows = np.array(
            [r[0] for r in con.execute("SELECT row FROM vectors WHERE fingerprint=?", (fp,))], np.int64
        )
        if len(rows) and (rows.max() >= n or rows.min() < 0):
            problems.append(f"{data}: map points past the end of the file ({rows.max()} >= {n} rows)")
            continue
        if len(np.unique(rows)) != len(rows):
            problems.append(f"{data}: two entries share one vector row")
        if n:
            mapped = np.zeros(n, bool)
            mapped[rows] = True
            mm = np.memmap(data, dtype=np.float32, mode="r", shape=(n, dim))
            leaked = sum(
                int(np.any(mm[s : s + 65536][~mapped[s : s + 65536]] != 0, axis=1).sum())
                for s in range(0, n, 65536)
            )
            if leaked:
                problems.append(
                    f"{data}: {leaked} unmapped rows still hold vectors (deleted content not scrubbed)"
                )
        fps = [f for f in fps if f != fp]
    for fp in fps:
        problems.append(f"vector map for fingerprint {fp!r} has no vector file")
    return problems
