"""MemoryBank: entries, ids, edits, history/rollback, JSONL, bad input, verify, snapshot reads, vector cache."""

import json
import sqlite3
import threading

import numpy as np
import pytest

from memlm.bank import BankError, MemoryBank, UnknownEntryError, VectorCache
from memlm.encode import HashingEncoder
from memlm.errors import InputError


@pytest.fixture
def bank(tmp_path):
    with MemoryBank.create(tmp_path / "b") as b:
        yield b


def facts(n, ns="default"):
    return [{"subject": f"person {i}", "relation": "born in", "object": f"city {i % 7}",
             "text": f"Person {i} was born in city {i % 7}.", "namespace": ns} for i in range(n)]  # fmt: skip


def snapshot(b):
    return [(e.id, e.content()) for e in b.iter_entries()]


def test_add_get_update_delete_count(bank):
    i = bank.add(subject="France", relation="capital", object="Paris", text="The capital of France is Paris.")
    e = bank.get(i)
    assert (e.subject, e.object, e.version, e.namespace) == ("France", "Paris", 1, "default")
    ids = bank.add_many(facts(10, "bios"))
    assert ids == list(range(1, 11)) and bank.count() == 11 and bank.count(["bios"]) == 10
    e2 = bank.update(i, object="Lyon")
    assert e2.text == "The capital of France is Lyon." and e2.version == 2 and e2.created == e.created
    bank.delete(ids[:3])
    assert bank.count() == 8 and ids[0] not in bank
    with pytest.raises(UnknownEntryError, match="no entry with id 1"):
        bank.get(ids[0])
    assert [x.id for x in bank.iter_entries(["bios"])] == ids[3:]


def test_ids_are_never_reused(bank):
    a = bank.add("one")
    b = bank.add("two")
    bank.delete(b)
    assert bank.add("three") == b + 1
    with pytest.raises(InputError, match=f"id {b} is already used"):
        bank.add("again", id=b)
    assert bank.add("explicit", id=100) == 100 and bank.add("next") == 101 and a == 0


def test_unknown_ids_and_bad_updates_change_nothing(bank):
    bank.add_many(facts(3))
    v = bank.version
    with pytest.raises(UnknownEntryError):
        bank.delete([0, 42])
    with pytest.raises(UnknownEntryError):
        bank.update(42, text="x")
    with pytest.raises(InputError, match="field 'colour'"):
        bank.update(0, colour="red")
    assert bank.count() == 3 and bank.version == v


def test_history_and_rollback(bank):
    ids = bank.add_many(facts(5))
    v1, before = bank.version, snapshot(bank)
    bank.update(ids[0], object="Rome")
    bank.delete(ids[1])
    new = bank.add("a later entry")
    bank.update(ids[2], namespace="other")
    assert [r.op for r in bank.history(ids[0])] == ["add", "update"]
    assert bank.history(ids[0])[-1].entry["object"] == "Rome"
    assert bank.history(ids[1])[-1].entry is None
    changed = bank.rollback(v1)
    assert changed == 4 and snapshot(bank) == before and new not in bank
    assert bank.add("after rollback") > new  # the rolled-back id stays retired
    # rollback is itself a version, so it can be undone
    bank.rollback(v1 + 4)
    assert bank.get(ids[0]).object == "Rome" and ids[1] not in bank


def test_purge_erases_history(bank):
    i = bank.add("secret fact")
    bank.update(i, text="secret fact v2")
    bank.delete(i, purge=True)
    assert all(r.entry is None or "secret" not in json.dumps(r.entry) for r in bank.history(i))
    raw = bank.connection.execute("SELECT COUNT(*) FROM log WHERE before LIKE '%secret%'").fetchone()[0]
    assert raw == 0
    bank.rollback(1)
    assert i not in bank  # purged content cannot come back


def test_jsonl_round_trip_and_errors(bank, tmp_path):
    src = tmp_path / "facts.jsonl"
    rows = facts(4, "geo") + [{"text": "plain entry"},
                              {"subject": "A", "relation": "r", "object": "o", "text": "A r o", "aliases": ["Ay"], "frozen": True}]  # fmt: skip
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ids = bank.import_jsonl(src)
    assert len(ids) == 6 and bank.get(ids[-1]).aliases == ("Ay",) and bank.get(ids[-1]).frozen
    out = tmp_path / "out.jsonl"
    assert bank.export_jsonl(out) == 6
    with MemoryBank.create(tmp_path / "b2") as b2:
        b2.import_jsonl(out)
        assert snapshot(b2) == snapshot(bank)

    v, n = bank.version, bank.count()
    bad = tmp_path / "bad.jsonl"
    for line, field, match in [
        ('{"text": "ok"}\n{"text": "x", "subject": 5}\n', "subject", "bad.jsonl:2: field 'subject'"),
        ('{"text": "ok"}\n{"text": "ok"\n', None, "bad.jsonl:2: invalid JSON"),
        ('{"txt": "typo"}\n', "txt", "field 'txt': unknown field"),
        ('{"text": "x", "id": true}\n', "id", "field 'id'"),
        ('{"subject": "s", "object": "o"}\n', "relation", "field 'relation'"),
    ]:
        bad.write_text(line)
        with pytest.raises(InputError, match=match) as ei:
            bank.import_jsonl(bad)
        assert ei.value.field == field
    assert bank.version == v and bank.count() == n  # nothing half-imported


def test_newer_format_and_corrupt_database(tmp_path):
    MemoryBank.create(tmp_path / "new").close()
    con = sqlite3.connect(tmp_path / "new" / "bank.sqlite")
    con.execute("UPDATE meta SET value='99' WHERE key='format_version'")
    con.commit()
    con.close()
    with pytest.raises(BankError, match="newer memlm"):
        MemoryBank.open(tmp_path / "new")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "bank.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BankError, match="corrupt or not a memlm bank"):
        MemoryBank.open(tmp_path / "junk")
    with pytest.raises(BankError, match="not a memlm bank"):
        MemoryBank.open(tmp_path / "nothing")
    with pytest.raises(BankError, match="already exists"):
        MemoryBank.create(tmp_path / "new")


def test_verify_finds_tampering(bank):
    bank.add_many(facts(20))
    VectorCache(bank, HashingEncoder(dim=16)).sync()
    assert bank.verify() == []
    bank.connection.execute("UPDATE entries SET text='tampered' WHERE id=3")
    bank.connection.execute("INSERT INTO aliases VALUES ('x', 999, 'x')")
    problems = bank.verify()
    assert any("entry 3: content hash" in p for p in problems)
    assert any("alias rows of missing entries" in p for p in problems)


def test_reader_sees_consistent_snapshots(tmp_path):
    """While a writer commits batches of 50, a reader never sees a partial batch."""
    path = tmp_path / "b"
    MemoryBank.create(path).close()
    stop = threading.Event()

    def write():
        with MemoryBank.open(path) as w:
            for _ in range(30):
                w.add_many({"text": f"row {j}"} for j in range(50))
            stop.set()

    t = threading.Thread(target=write)
    t.start()
    seen = []
    with MemoryBank.open(path, readonly=True) as r:
        while not stop.is_set():
            seen.append(sum(1 for _ in r.iter_entries(batch_size=7)))
    t.join()
    assert seen and all(n % 50 == 0 for n in seen)


class CountingEncoder(HashingEncoder):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = 0

    def encode(self, texts):
        self.seen += len(texts)
        return super().encode(texts)


def test_vector_cache_reencodes_only_changes_and_scrubs_deleted(bank):
    ids = bank.add_many(facts(50))
    enc = CountingEncoder(dim=32)
    cache = VectorCache(bank, enc)
    assert cache.sync() == 50 and cache.sync() == 0
    v7 = cache.get([ids[7]])
    bank.update(ids[7], object="Oslo")
    bank.update(ids[8], namespace="moved")  # content hash unchanged: no re-encode
    enc.seen = 0
    assert cache.sync() == 1 and enc.seen == 1
    assert not np.allclose(cache.get([ids[7]]), v7)
    np.testing.assert_allclose(cache.get([ids[7]]), enc.encode([bank.get(ids[7]).text]), atol=1e-6)
    # another encoder (or checkpoint) = another fingerprint: nothing reused
    assert VectorCache(bank, HashingEncoder(dim=32, char_weight=0.0)).sync() == 50
    row = bank.connection.execute("SELECT row FROM vectors WHERE entry_id=? AND fingerprint=?",
                                  (ids[9], enc.fingerprint)).fetchone()[0]  # fmt: skip
    bank.delete(ids[9])
    raw = np.fromfile(cache.data_path, np.float32).reshape(-1, 32)
    assert not raw[row].any()  # the deleted entry's vector is gone from disk, not just unmapped
    with pytest.raises(InputError, match=f"no up-to-date vector for entry {ids[9]}"):
        cache.get([ids[9]])
    assert bank.verify() == []


@pytest.mark.parametrize(
    "line, field",
    [
        ({"subject": "A", "relation": "r", "object": "o", "text": "A r o.", "subjet": "typo"}, "subjet"),
        ({"subject": " ", "relation": "r", "object": "o", "text": "t"}, "subject"),
        ({"subject": "A", "relation": 3, "object": "o", "text": "t"}, "relation"),
    ],
)
def test_facts_and_bank_import_apply_the_same_rules(tmp_path, line, field):
    """One validator: what memlm.data refuses in a facts file, the bank import refuses with the same error."""
    from memlm.data.facts import iter_facts
    from memlm.errors import InputError

    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"subject": "B", "relation": "r", "object": "o", "text": "B r o."}) + "\n"
                    + json.dumps(line) + "\n")  # fmt: skip
    errors = []
    for read in (
        lambda: list(iter_facts(path)),
        lambda: MemoryBank.create(tmp_path / "b").import_jsonl(path),
    ):
        with pytest.raises(InputError) as info:
            read()
        errors.append(str(info.value))
    assert errors[0] == errors[1] and errors[0].startswith(f"{path}:2: field '{field}'")


def test_layers_import_downwards(tmp_path):
    """bank below index below model: the bank (verify, purge included) never imports memlm.index, and index
    modules import the kinds table from memlm.index.kinds, not from their own package's __init__."""
    import pathlib
    import subprocess
    import sys

    code = (
        "import sys; from memlm.bank import MemoryBank; b = MemoryBank.create(sys.argv[1]); i = b.add(text='x');"
        "b.verify(); b.delete(i, purge=True); b.close();"
        "print(sorted(m for m in sys.modules if m.startswith(('memlm.index', 'memlm.model'))))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.strip() == "[]"
    root = pathlib.Path(__file__).resolve().parents[1] / "memlm"
    for path in (root / "index").glob("*.py"):
        assert "from memlm.index import" not in path.read_text(), path
    assert "_connect" not in (root / "bank" / "vectors.py").read_text()
