"""Purge erases every byte of an entry from the bank folder, even with a reader open and secure_delete off."""

import sqlite3

import numpy as np
import pytest

from memlm.bank import ArtifactStore, MemoryBank, VectorCache
from memlm.encode import HashingEncoder
from memlm.index import Retriever, load_index

SECRET = "Quentin Zabrowski-Oyelaran keeps the vault code 4471-X9 under the blue lamp."


def _files_containing(folder, needle: bytes) -> list[str]:
    return [str(p) for p in sorted(folder.rglob("*")) if p.is_file() and needle in p.read_bytes()]


@pytest.fixture
def stock_sqlite(monkeypatch):
    """Every new SQLite connection starts with secure_delete OFF, as stock SQLite builds do."""
    real = sqlite3.connect

    def connect(*args, **kwargs):
        con = real(*args, **kwargs)
        con.execute("PRAGMA secure_delete=OFF")
        return con

    monkeypatch.setattr(sqlite3, "connect", connect)
    assert sqlite3.connect(":memory:").execute("PRAGMA secure_delete").fetchone()[0] == 0


def test_purge_leaves_no_byte_with_a_reader_open(tmp_path, stock_sqlite):
    bank = MemoryBank.create(tmp_path / "b")
    bank.add_many({"text": f"Filler person {i} was born in town {i % 7}."} for i in range(300))
    sid = bank.add(text=SECRET.replace("4471", "0000"))
    bank.update(sid, text=SECRET)  # the log now holds an older version too
    enc = HashingEncoder(dim=32)
    for kind, params in [("exact", {}), ("faiss", {"spec": "HNSW8"}), ("pk", {"cell_size": 4})]:
        Retriever.build(bank, enc, kind=kind, **params).save(kind)
    store = ArtifactStore(bank, "toy-design", fingerprint="toy:1")
    store.put(bank.get(sid), {"token_bytes": np.frombuffer(SECRET.encode(), np.uint8)})
    vec = VectorCache(bank, enc).get([sid])[0].tobytes()
    needles = {"text": SECRET.encode(), "vector": vec}
    for what, needle in needles.items():
        assert _files_containing(bank.path, needle), f"the {what} should be on disk before the purge"

    reader = MemoryBank.open(tmp_path / "b", readonly=True)
    rows = reader.iter_entries()
    next(rows)  # holds a read transaction on the snapshot that still has the secret
    bank.delete([sid], purge=True)
    assert bank.erasure_pending  # the reader's snapshot blocks the truncating checkpoint
    rows.close()
    reader.close()  # the reader that blocked the erasure completes it
    assert not bank.erasure_pending

    for what, needle in needles.items():
        assert _files_containing(bank.path, needle) == [], f"purged {what} still on disk"
    assert _files_containing(bank.path, b"Filler person 123 was born")  # the scan does see live text
    for kind in ("exact", "faiss", "pk"):
        ids = load_index(bank.path / "indexes" / kind).ids()
        assert sid not in ids and len(ids) == 300
    assert store.get(bank.get(0)) is None and len(store) == 0
    assert bank.verify() == []
    bank.close()


def test_plain_delete_stays_reversible_and_says_so(tmp_path, capsys):
    from memlm.cli import main

    b = str(tmp_path / "b")
    main(["bank", "create", b])
    main(["bank", "add", b, "--text", SECRET])
    capsys.readouterr()
    main(["bank", "delete", b, "0"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "reversible" in out[0] and "--purge erases for good" in out[0]
    main(["bank", "rollback", b, "1"])
    with MemoryBank.open(b) as bank:
        assert bank.get(0).text == SECRET
    main(["bank", "delete", b, "0", "--purge"])
    assert "gone from every file" in capsys.readouterr().out
    assert _files_containing(tmp_path / "b", SECRET.encode()) == []


def test_purge_removes_derived_stores_it_cannot_rewrite(tmp_path):
    """A store of a kind no loaded code knows, or a damaged one, is deleted (derived: rebuilt on next use)."""
    bank = MemoryBank.create(tmp_path / "b")
    sid = bank.add(text=SECRET)
    Retriever.build(bank, HashingEncoder(dim=16), kind="exact").save("broken")
    (bank.path / "indexes" / "broken" / "shard0000" / "exact.safetensors").write_bytes(
        b"garbage " + SECRET.encode()
    )
    alien = bank.path / "derived" / "alien"
    alien.mkdir(parents=True)
    (alien / "manifest.json").write_text('{"kind": "not-loaded-here"}')
    (alien / "data.bin").write_bytes(SECRET.encode())
    bank.delete(sid, purge=True)
    assert not (bank.path / "indexes" / "broken").exists() and not alien.exists()
    assert _files_containing(bank.path, SECRET.encode()) == []
    bank.close()
