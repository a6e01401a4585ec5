"""MemoryBank: the embedded store of memory entries (one directory, SQLite in WAL mode).

Layout of a bank directory::

    bank.sqlite        entries, aliases, the edit log, the vector-cache map, meta (format version, bank version)
    vectors/*.f32      derived float32 vectors, one file per encoder fingerprint (see memlm.bank.vectors)
    indexes/<name>/    derived search indexes (see memlm.index)
    derived/<name>/    other derived stores, e.g. a memory design's per-entry artifacts (memlm.bank.artifacts)

Why SQLite/WAL: every edit is one transaction, so a crash (even ``kill -9``) leaves the last committed
state; readers keep a consistent snapshot while a writer works; no server to run. ``synchronous=NORMAL``
survives a process crash; pass ``durable=True`` for fsync on every commit (power loss).

Erasure (``delete(..., purge=True)``): ``secure_delete`` is set on every connection, so SQLite zeroes freed
record space instead of leaving it in free pages (stock SQLite compiles it off); after the commit the WAL is
checkpointed with TRUNCATE, cached vectors are zeroed and every derived store is rewritten without the
entries (memlm.bank.derived). A reader holding an older snapshot blocks the checkpoint: the bank then leaves
the marker file ``erasure-pending`` and finishes the checkpoint when a bank is next closed or opened.

Versions: the bank version increases by one per committed transaction (one ``add_many`` = one version).
The log stores each edited entry's previous content, so ``history`` and ``rollback`` need no snapshot.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from memlm.bank.entry import CONTENT_FIELDS, Entry, content_hash, lookup_key, normalise
from memlm.bank.records import ValidRecord, read_jsonl, validate
from memlm.errors import InputError, MemlmError

FORMAT_VERSION = 1
DB_NAME = "bank.sqlite"
PENDING = "erasure-pending"  # marker: a purge committed but its WAL checkpoint was blocked by a reader

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries(
    id INTEGER PRIMARY KEY, text TEXT NOT NULL, subject TEXT, relation TEXT, object TEXT,
    namespace TEXT NOT NULL, frozen INTEGER NOT NULL, source TEXT,
    created REAL NOT NULL, updated REAL NOT NULL, version INTEGER NOT NULL,
    content_hash TEXT NOT NULL, key TEXT);
CREATE INDEX entries_key ON entries(key) WHERE key IS NOT NULL;
CREATE INDEX entries_ns ON entries(namespace);
CREATE TABLE aliases(alias_key TEXT NOT NULL, entry_id INTEGER NOT NULL, alias TEXT NOT NULL);
CREATE INDEX aliases_key ON aliases(alias_key);
CREATE INDEX aliases_entry ON aliases(entry_id);
-- one row per edited entry per transaction; `before` = content before the edit (NULL for an add or a purge)
CREATE TABLE log(seq INTEGER PRIMARY KEY, version INTEGER NOT NULL, entry_id INTEGER NOT NULL,
                 op TEXT NOT NULL, before TEXT, time REAL NOT NULL);
CREATE INDEX log_entry ON log(entry_id);
CREATE INDEX log_version ON log(version);
CREATE TABLE vectors(fingerprint TEXT NOT NULL, entry_id INTEGER NOT NULL, row INTEGER NOT NULL,
                     content_hash TEXT NOT NULL, PRIMARY KEY(fingerprint, entry_id)) WITHOUT ROWID;
CREATE INDEX vectors_entry ON vectors(entry_id);  -- deleting an entry must not scan every fingerprint's map
"""

_COLS = (
    "id, text, subject, relation, object, namespace, frozen, source, created, updated, version, content_hash"
)


class BankError(MemlmError):
    """A bank that is missing, corrupt, from a newer memlm, or an edit the bank refuses."""


class UnknownEntryError(BankError, KeyError):
    """An id that is not (or no longer) in the bank."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Revision:
    """One step in an entry's history: the state right after bank version ``version`` (None = deleted)."""

    version: int
    op: str  # add | update | delete | restore
    time: float
    entry: dict | None


def _connect(db: Path, *, readonly: bool = False, durable: bool = False) -> sqlite3.Connection:
    uri = f"file:{db}?mode={'ro' if readonly else 'rw'}"
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly one edit.
    con = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0, check_same_thread=False)
    con.execute("PRAGMA busy_timeout=30000")
    con.execute("PRAGMA secure_delete=ON")  # freed record space is zeroed, so purged text leaves the file
    if not readonly:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    return con


class MemoryBank:
    """An editable store of memory entries with stable int64 ids (never reused), history and rollback.

    Open with :meth:`create` or :meth:`open`; use as a context manager or call :meth:`close`.
    Nothing here loads the whole bank into Python objects: iteration, import and export stream.
    """

    def __init__(self, path: Path, con: sqlite3.Connection, *, readonly: bool) -> None:
        self.path, self._con, self.readonly = path, con, readonly
        self._scrub: list[tuple[str, int]] = []  # cached-vector rows to zero once this transaction commits

    # ---------------------------------------------------------------- open / create
    @classmethod
    def create(
        cls, path: str | os.PathLike, *, encoder: str = "hashing", exist_ok: bool = False
    ) -> MemoryBank:
        """Create an empty bank directory. ``encoder`` is the default encoder spec (see memlm.encode)."""
        path = Path(path)
        db = path / DB_NAME
        if db.exists():
            if exist_ok:
                return cls.open(path)
            raise BankError(f"{path}: a bank already exists here")
        if path.exists() and any(path.iterdir()):
            raise BankError(f"{path}: folder exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / (DB_NAME + ".creating")
        tmp.unlink(missing_ok=True)
        con = sqlite3.connect(tmp, isolation_level=None)
        con.execute("PRAGMA secure_delete=ON")
        con.executescript(_SCHEMA)
        now = time.time()
        meta = {
            "format_version": FORMAT_VERSION,
            "version": 0,
            "next_id": 0,
            "encoder": encoder,
            "created": now,
        }
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        con.close()
        os.replace(tmp, db)  # the bank appears complete or not at all
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike, *, readonly: bool = False, durable: bool = False) -> MemoryBank:
        """Open an existing bank; refuses a corrupt database or one written by a newer format."""
        path = Path(path)
        db = path / DB_NAME
        if not db.is_file():
            raise BankError(f"{path}: not a memlm bank (no {DB_NAME})")
        try:
            con = _connect(db, readonly=readonly, durable=durable)
            rows = dict(con.execute("SELECT key, value FROM meta").fetchall())
            fmt = json.loads(rows["format_version"])
        except (sqlite3.DatabaseError, KeyError, ValueError) as e:
            raise BankError(f"{db}: corrupt or not a memlm bank database ({e})") from None
        if fmt > FORMAT_VERSION:
            con.close()
            raise BankError(
                f"{db}: written by a newer memlm (bank format {fmt}, this memlm reads <= {FORMAT_VERSION})"
            )
        bank = cls(path, con, readonly=readonly)
        bank.finish_erasure()
        return bank

    def close(self) -> None:
        self._con.close()
        self.finish_erasure()

    @property
    def erasure_pending(self) -> bool:
        """True while a purge's text may still sit in ``bank.sqlite-wal`` (a reader blocked the checkpoint)."""
        return (self.path / PENDING).exists()

    def finish_erasure(self, *, wait_s: float = 0.0) -> bool:
        """Checkpoint the WAL into the database and truncate it, if a purge left that pending.

        Returns True when nothing is pending any more. Needs no open transaction anywhere on an older
        snapshot; waits at most ``wait_s`` for one to end. Works from a read-only bank too (it opens its own
        short read-write connection), so the reader that blocked a purge completes it when it closes.
        """
        if not self.erasure_pending:
            return True
        try:
            con = sqlite3.connect(self.path / DB_NAME, isolation_level=None, timeout=wait_s)
            try:
                con.execute(f"PRAGMA busy_timeout={int(wait_s * 1000)}")
                busy = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:  # locked or read-only file system: leave it for the next open
            return False
        if busy:
            return False
        (self.path / PENDING).unlink(missing_ok=True)
        return True

    def __enter__(self) -> MemoryBank:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryBank({str(self.path)!r}, entries={self.count()}, version={self.version})"

    # ---------------------------------------------------------------- transactions
    def _meta(self, key: str):
        row = self._con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _set_meta(self, key: str, value) -> None:
        self._con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    @contextmanager
    def _write(self) -> Iterator[int]:
        """One transaction = one bank version. Yields the new version; any exception rolls back."""
        if self.readonly:
            raise BankError(f"{self.path}: opened read-only")
        # IMMEDIATE takes the write lock now, so two writers queue instead of failing mid-way.
        self._con.execute("BEGIN IMMEDIATE")
        try:
            version = self._meta("version") + 1
            self._set_meta("version", version)
            yield version
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            self._scrub = []
            raise
        if self._scrub:
            # Deletion is real: the vectors of deleted/changed entries are overwritten with zeros, not just
            # unmapped. (A crash right here leaves unmapped rows; `verify` finds them, the next sync zeroes them.)
            from memlm.bank.vectors import zero_rows

            zero_rows(self.path, self._scrub)
            self._scrub = []

    @property
    def version(self) -> int:
        """The bank version: the number of committed transactions so far."""
        return self._meta("version")

    @property
    def default_encoder(self) -> str:
        return self._meta("encoder")

    # ---------------------------------------------------------------- reads
    def _entries(self, rows: list[tuple]) -> list[Entry]:
        if not rows:
            return []
        ids = [r[0] for r in rows]
        aliases: dict[int, list[str]] = {}
        for chunk in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            part = ids[chunk : chunk + 900]
            q = f"SELECT entry_id, alias FROM aliases WHERE entry_id IN ({','.join('?' * len(part))}) ORDER BY rowid"
            for eid, alias in self._con.execute(q, part):
                aliases.setdefault(eid, []).append(alias)
        return [
            Entry(
                id=r[0], text=r[1], subject=r[2], relation=r[3], object=r[4], namespace=r[5], frozen=bool(r[6]),
                source=r[7], aliases=tuple(aliases.get(r[0], ())), created=r[8], updated=r[9], version=r[10],
                content_hash=r[11],
            )
            for r in rows
        ]  # fmt: skip

    def get(self, entry_id: int) -> Entry:
        """The entry with this id; raises UnknownEntryError if it does not exist (or was deleted)."""
        row = self._con.execute(f"SELECT {_COLS} FROM entries WHERE id=?", (int(entry_id),)).fetchone()
        if row is None:
            raise UnknownEntryError(f"{self.path}: no entry with id {entry_id}")
        return self._entries([row])[0]

    def get_many(self, ids: Sequence[int], *, missing_ok: bool = False) -> list[Entry | None]:
        """Entries in the order of ``ids``; a missing id raises, or gives None with ``missing_ok``."""
        ids = [int(i) for i in ids]
        found: dict[int, Entry] = {}
        for chunk in range(0, len(ids), 900):
            part = ids[chunk : chunk + 900]
            rows = self._con.execute(
                f"SELECT {_COLS} FROM entries WHERE id IN ({','.join('?' * len(part))})", part
            )
            found.update((e.id, e) for e in self._entries(rows.fetchall()))
        if not missing_ok and len(found) < len(set(ids)):
            bad = next(i for i in ids if i not in found)
            raise UnknownEntryError(f"{self.path}: no entry with id {bad}")
        return [found.get(i) for i in ids]

    def __contains__(self, entry_id: int) -> bool:
        return self._con.execute("SELECT 1 FROM entries WHERE id=?", (int(entry_id),)).fetchone() is not None

    def count(self, namespaces: Sequence[str] | None = None) -> int:
        if namespaces is None:
            return self._con.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        q = f"SELECT COUNT(*) FROM entries WHERE namespace IN ({','.join('?' * len(namespaces))})"
        return self._con.execute(q, list(namespaces)).fetchone()[0]

    def __len__(self) -> int:
        return self.count()

    def namespaces(self) -> dict[str, int]:
        """Namespace -> number of entries."""
        return dict(
            self._con.execute("SELECT namespace, COUNT(*) FROM entries GROUP BY namespace ORDER BY namespace")
        )

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A separate read-only connection inside one read transaction: every query on it sees the bank as
        it was at its first read, whatever is written meanwhile (streaming readers use it)."""
        con = _connect(self.path / DB_NAME, readonly=True)
        try:
            con.execute("BEGIN")  # the snapshot is taken at the first read and held until COMMIT
            yield con
            con.execute("COMMIT")
        finally:
            con.close()

    def iter_entries(
        self, namespaces: Sequence[str] | None = None, *, batch_size: int = 2000
    ) -> Iterator[Entry]:
        """Stream entries in id order from one consistent snapshot (a separate read transaction),
        so a writer working meanwhile never shows a half-applied edit to this iteration."""
        with self.snapshot() as con:
            where = ""
            args: list = []
            if namespaces is not None:
                where = f"WHERE namespace IN ({','.join('?' * len(namespaces))})"
                args = list(namespaces)
            cur = con.execute(f"SELECT {_COLS} FROM entries {where} ORDER BY id", args)
            reader = MemoryBank(self.path, con, readonly=True)
            while rows := cur.fetchmany(batch_size):
                yield from reader._entries(rows)

    def __iter__(self) -> Iterator[Entry]:
        return self.iter_entries()

    def changed_since(self, version: int) -> list[int]:
        """Ids of entries added, edited or deleted after bank version ``version`` (for incremental index updates)."""
        # INDEXED BY: for DISTINCT the planner would otherwise walk the whole log in entry_id order
        rows = self._con.execute(
            "SELECT entry_id FROM log INDEXED BY log_version WHERE version > ?", (version,)
        )
        return sorted({r[0] for r in rows})

    # ---------------------------------------------------------------- writes
    def _insert(self, recs: list[dict], version: int, now: float, op: str = "add") -> list[int]:
        """Insert validated records (inside a transaction); assigns ids, writes aliases and log rows."""
        next_id = self._meta("next_id")
        ids = []
        for r in recs:
            eid = r.get("id")
            if eid is None:
                eid = next_id
            elif (
                op == "add"
                and self._con.execute(
                    "SELECT 1 FROM log WHERE entry_id=? UNION ALL SELECT 1 FROM entries WHERE id=? LIMIT 1",
                    (eid, eid),
                ).fetchone()
            ):
                # ids are never reused: an id seen in the log belonged to an entry, even a deleted one.
                raise InputError(f"id {eid} is already used (ids are never reused)", field="id")
            next_id = max(next_id, eid + 1)
            ids.append(eid)
        if len(set(ids)) != len(ids):
            raise InputError("the same id appears twice in one import", field="id")
        self._set_meta("next_id", next_id)
        self._con.executemany(
            f"INSERT INTO entries ({_COLS}, key) VALUES ({','.join('?' * 13)})",
            [
                (
                    eid, r["text"], r["subject"], r["relation"], r["object"], r["namespace"], int(r["frozen"]),
                    r["source"], r.get("created", now), now, r.get("version", 0) + 1,
                    content_hash(r["text"], r["subject"], r["relation"], r["object"]),
                    lookup_key(r["subject"], r["relation"]),
                )
                for eid, r in zip(ids, recs)
            ],
        )  # fmt: skip
        alias_rows = [
            (lookup_key(a, r["relation"]), eid, a)
            for eid, r in zip(ids, recs)
            for a in r["aliases"]
            if normalise(a)
        ]
        if alias_rows:
            self._con.executemany("INSERT INTO aliases VALUES (?, ?, ?)", alias_rows)
        self._con.executemany("INSERT INTO log (version, entry_id, op, before, time) VALUES (?, ?, ?, NULL, ?)",
                              [(version, eid, op, now) for eid in ids])  # fmt: skip
        return ids

    def add(self, text: str | None = None, **fields) -> int:
        """Add one entry and return its id.

        Fields: ``subject``, ``relation``, ``object`` (an optional triple; ``text`` defaults to the triple
        joined by spaces), ``namespace`` ("default"), ``frozen`` (False), ``source``, ``aliases``
        (other names of the subject, for lexical lookup), ``id`` (optional explicit id, must be unused).
        """
        rec = validate({"text": text, **fields})
        with self._write() as version:
            return self._insert([rec], version, time.time())[0]

    def add_many(
        self, records: Iterable[dict], *, batch_size: int = 5000, progress: bool = False
    ) -> list[int]:
        """Add many entries in ONE transaction, streamed in batches (executemany): all or nothing.

        ``records`` yields dicts with the fields of :meth:`add` (already-validated dicts from
        ``read_jsonl`` pass through). Returns the new ids in input order.
        """
        import itertools

        records = iter(records)
        first = next(records, None)
        if first is None:
            return []  # nothing to add: no transaction, no new version
        records = itertools.chain([first], records)
        ids: list[int] = []
        bar = tqdm(desc="add", unit=" entries", disable=not progress)
        with self._write() as version:
            now = time.time()
            batch: list[dict] = []
            for rec in records:
                batch.append(rec if _is_validated(rec) else validate(rec))
                if len(batch) >= batch_size:
                    ids += self._insert(batch, version, now)
                    bar.update(len(batch))
                    batch = []
            if batch:
                ids += self._insert(batch, version, now)
                bar.update(len(batch))
        bar.close()
        return ids

    def import_jsonl(
        self, path: str | os.PathLike, *, namespace: str | None = None, progress: bool = False
    ) -> list[int]:
        """Import a facts JSONL file in one transaction (an error on any line imports nothing).

        A file without any entry is an error too (as for ``memlm data ingest``): the bank stays unchanged."""
        ids = self.add_many(read_jsonl(path, namespace=namespace), progress=progress)
        if not ids:
            raise InputError("no entries (the file is empty or has only blank lines)", path=path)
        return ids

    def export_jsonl(self, path: str | os.PathLike, *, namespaces: Sequence[str] | None = None) -> int:
        """Write entries as facts JSONL (with ids), atomically. Returns the number written."""
        from memlm.utils.io import atomic_path

        n = 0
        with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
            for e in self.iter_entries(namespaces):
                d = {"id": e.id, **{k: v for k, v in e.content().items() if v not in (None, [], False)}}
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
                n += 1
        return n

    def _log_before(self, entries: list[Entry], op: str, version: int, now: float) -> None:
        self._con.executemany(
            "INSERT INTO log (version, entry_id, op, before, time) VALUES (?, ?, ?, ?, ?)",
            [(version, e.id, op, json.dumps(_state(e), ensure_ascii=False), now) for e in entries],
        )

    def _delete_rows(self, ids: list[int], *, vectors: bool = True) -> None:
        """Remove entries, their aliases and (unless ``vectors=False``) their cached vectors: deletion is real."""
        for chunk in range(0, len(ids), 900):
            part = ids[chunk : chunk + 900]
            marks = ",".join("?" * len(part))
            for table, col in (("entries", "id"), ("aliases", "entry_id")):
                self._con.execute(f"DELETE FROM {table} WHERE {col} IN ({marks})", part)
            if vectors:
                q = f"SELECT fingerprint, row FROM vectors WHERE entry_id IN ({marks})"
                self._scrub += self._con.execute(q, part).fetchall()
                self._con.execute(f"DELETE FROM vectors WHERE entry_id IN ({marks})", part)

    def update(self, entry_id: int, **changes) -> Entry:
        """Change some content fields of one entry (one transaction); returns the new entry.

        The entry keeps its id; its version increases; the previous content goes to the log.
        """
        bad = sorted(set(changes) - set(CONTENT_FIELDS))
        if bad:
            raise InputError(f"cannot update field (updatable: {', '.join(CONTENT_FIELDS)})", field=bad[0])
        with self._write() as version:
            old = self.get(entry_id)
            content = old.content() | changes
            if "text" not in changes:
                content["text"] = _retext(old, changes)
            rec = validate(content)
            now = time.time()
            self._log_before([old], "update", version, now)
            same = (
                content_hash(rec["text"], rec["subject"], rec["relation"], rec["object"]) == old.content_hash
            )
            self._delete_rows([old.id], vectors=not same)  # a namespace/flag change keeps its vectors
            self._insert(
                [rec | {"id": old.id, "created": old.created, "version": old.version}], version, now, "edit"
            )
            self._con.execute(
                "DELETE FROM log WHERE version=? AND entry_id=? AND op='edit'", (version, old.id)
            )
        return self.get(entry_id)

    def delete(self, ids: int | Sequence[int], *, purge: bool = False) -> int:
        """Delete entries (one transaction). Unknown ids raise, deleting nothing.

        A plain delete is reversible: ``history`` keeps the old content and ``rollback`` restores it (use it
        for corrections). ``purge`` erases the entries for good (right-to-be-forgotten): their past content
        leaves the log, and then every file of the bank (see the module docstring). Check
        :attr:`erasure_pending` afterwards: True means a reader still holds the old text in the WAL.
        """
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        with self._write() as version:
            old = self.get_many(ids)
            self._log_before(old, "delete", version, time.time())
            self._delete_rows(ids)
            if purge:
                for chunk in range(0, len(ids), 900):
                    part = ids[chunk : chunk + 900]
                    self._con.execute(
                        f"UPDATE log SET before=NULL WHERE entry_id IN ({','.join('?' * len(part))})", part
                    )
                # the marker goes first: a crash between here and the checkpoint still finishes it later
                (self.path / PENDING).touch()
        if purge:
            from memlm.bank import derived

            derived.drop_entries(self.path, np.asarray(ids, np.int64))
            self.finish_erasure(wait_s=2.0)
        return len(ids)

    # ---------------------------------------------------------------- history / rollback
    def history(self, entry_id: int) -> list[Revision]:
        """Every committed change to one entry, oldest first, with the entry's state after each."""
        rows = self._con.execute(
            "SELECT version, op, time, before FROM log WHERE entry_id=? ORDER BY seq", (int(entry_id),)
        ).fetchall()
        if not rows:
            raise UnknownEntryError(f"{self.path}: no entry with id {entry_id}, now or ever")
        current = _state(self.get(entry_id)) if entry_id in self else None
        out = []
        for i, (version, op, t, _) in enumerate(rows):
            # the state after this change is what the next change saw as "before" (or today's entry)
            if op == "delete":
                after = None
            elif i + 1 < len(rows) and rows[i + 1][3]:
                after = json.loads(rows[i + 1][3])
            else:
                after = current
            out.append(Revision(version, op, t, after))
        return out

    def rollback(self, version: int) -> int:
        """Return every entry to its state at bank ``version``, as a new transaction (so it can be undone too).

        Entries added later are deleted (their ids stay retired), edited ones restored, deleted ones
        restored with their old id. Returns the number of entries changed. Purged entries stay gone.
        """
        current = self.version
        if not 0 <= version <= current:
            raise InputError(f"version must be between 0 and {current}, got {version}", field="version")
        with self._write() as new_version:
            # Target state of each touched entry = the `before` of its first change after `version`.
            rows = self._con.execute(
                "SELECT entry_id, op, before FROM log WHERE seq IN "
                "(SELECT MIN(seq) FROM log WHERE version > ? AND version < ? GROUP BY entry_id)",
                (version, new_version),
            ).fetchall()
            now = time.time()
            to_delete, to_restore = [], []
            for eid, op, before in rows:
                if op in ("add", "restore"):
                    to_delete.append(eid)
                elif before is not None:
                    to_restore.append((eid, json.loads(before)))
            existing = [e for e in self.get_many(to_delete, missing_ok=True) if e is not None]
            self._log_before(existing, "delete", new_version, now)
            self._delete_rows([e.id for e in existing])
            changed = len(existing)
            for eid, state in to_restore:
                old = self.get_many([eid], missing_ok=True)[0]
                if old is not None and _state(old) == state:
                    continue
                meta = {"id": eid, "created": state.pop("created"), "version": state.pop("version") - 1}
                if old is not None:
                    self._log_before([old], "update", new_version, now)
                    self._delete_rows([eid])
                    meta["version"] = old.version
                self._insert([validate(state) | meta], new_version, now, "restore")
                if old is not None:
                    self._con.execute(
                        "DELETE FROM log WHERE version=? AND entry_id=? AND op='restore'", (new_version, eid)
                    )
                changed += 1
        return changed

    def content_fingerprint(self, namespaces: Sequence[str] | None = None) -> str:
        """sha256 over every entry's (id, namespace, content hash) in id order: equal for two banks exactly
        when they hold the same entries. A model records it for the bank it was trained with."""
        import hashlib

        h = hashlib.sha256()
        where, args = "", []
        if namespaces is not None:
            where, args = f"WHERE namespace IN ({','.join('?' * len(namespaces))})", list(namespaces)
        cur = self._con.execute(f"SELECT id, namespace, content_hash FROM entries {where} ORDER BY id", args)
        while rows := cur.fetchmany(65536):
            h.update("".join(f"{i}\x1f{ns}\x1f{ch}\n" for i, ns, ch in rows).encode())
        return h.hexdigest()

    # ---------------------------------------------------------------- checks
    def stats(self) -> dict:
        """Counts and sizes, cheap enough for a 1M bank."""
        files = [p for p in self.path.rglob("*") if p.is_file()]
        n = self.count()
        size = sum(p.stat().st_size for p in files)
        fps = dict(self._con.execute("SELECT fingerprint, COUNT(*) FROM vectors GROUP BY fingerprint"))
        return {
            "path": str(self.path), "format_version": self._meta("format_version"), "version": self.version,
            "entries": n, "namespaces": self.namespaces(),
            "with_triple": self._con.execute("SELECT COUNT(*) FROM entries WHERE key IS NOT NULL").fetchone()[0],
            "frozen": self._con.execute("SELECT COUNT(*) FROM entries WHERE frozen=1").fetchone()[0],
            "aliases": self._con.execute("SELECT COUNT(*) FROM aliases").fetchone()[0],
            "log_rows": self._con.execute("SELECT COUNT(*) FROM log").fetchone()[0],
            "next_id": self._meta("next_id"), "default_encoder": self.default_encoder,
            "cached_vectors": fps, "disk_bytes": size, "disk_bytes_per_entry": size / n if n else 0.0,
        }  # fmt: skip

    def verify(self, *, progress: bool = False) -> list[str]:
        """Check database, vector arrays and derived stores (those whose code is loaded, e.g. saved indexes
        once memlm.index is imported) against each other. Returns problems ([] = healthy)."""
        from memlm.bank.derived import verify_stores
        from memlm.bank.vectors import verify_vectors

        problems: list[str] = []
        try:
            res = [r[0] for r in self._con.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as e:
            return [f"{self.path / DB_NAME}: database unreadable: {e}"]
        if res != ["ok"]:
            problems += [f"{self.path / DB_NAME}: {r}" for r in res[:20]]
            return problems
        next_id = self._meta("next_id")
        bar = tqdm(desc="verify", total=self.count(), unit=" entries", disable=not progress)
        for e in self.iter_entries():
            if e.content_hash != content_hash(e.text, e.subject, e.relation, e.object):
                problems.append(f"entry {e.id}: content hash does not match its content")
            if e.id >= next_id:
                problems.append(f"entry {e.id}: id >= next_id {next_id} (ids could be reused)")
            bar.update()
        bar.close()
        for q, what in (
            (
                "SELECT COUNT(*) FROM aliases WHERE entry_id NOT IN (SELECT id FROM entries)",
                "alias rows of missing entries",
            ),
            (
                "SELECT COUNT(*) FROM vectors WHERE entry_id NOT IN (SELECT id FROM entries)",
                "vector rows of missing entries",
            ),
            (
                "SELECT COUNT(*) FROM entries WHERE id NOT IN (SELECT entry_id FROM log)",
                "entries without a log row",
            ),
        ):
            n = self._con.execute(q).fetchone()[0]
            if n:
                problems.append(f"{n} {what}")
        problems += verify_vectors(self)
        problems += verify_stores(self)
        if self.erasure_pending:
            problems.append(
                f"{self.path / PENDING}: a purge is not complete (a reader blocked the WAL checkpoint)"
            )
        return problems

    # ---------------------------------------------------------------- internals for memlm.bank.vectors / index
    @property
    def connection(self) -> sqlite3.Connection:
        """The bank's SQLite connection (derived caches keep their maps in the same database)."""
        return self._con

    @contextmanager
    def write_transaction(self) -> Iterator[None]:
        """A write transaction that does not count as a bank version (derived data only)."""
        self._con.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise


def _retext(old: Entry, changes: dict) -> str | None:
    """Keep the human-readable text in step with a triple edit when the caller gives no new text:
    a text derived from the triple is derived again (None); otherwise the old object, if it occurs exactly
    once in the text, is replaced by the new one ("... is Paris." -> "... is Lyon.")."""
    if old.text == f"{old.subject} {old.relation} {old.object}" and {"subject", "relation", "object"} & set(
        changes
    ):
        return None
    new_obj = changes.get("object")
    if new_obj is not None and old.object and old.text.count(old.object) == 1:
        return old.text.replace(old.object, new_obj)
    return old.text


def _state(e: Entry) -> dict:
    """What the log keeps of an entry: its content plus created time and version."""
    return e.content() | {"created": e.created, "version": e.version}


def _is_validated(rec: dict) -> bool:
    return isinstance(rec, ValidRecord)
