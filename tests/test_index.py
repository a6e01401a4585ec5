"""Vector indexes: FAISS == exact (Flat), stated recall (IVF/HNSW/PQ/product keys), edits, deletes,
namespaces, save/load, bad input; and the Retriever keeping an index in step with a bank."""

import numpy as np
import pytest

from memlm.bank import MemoryBank
from memlm.encode import HashingEncoder
from memlm.errors import InputError
from memlm.index import ExactIndex, FaissIndex, IndexFileError, ProductKeyIndex, Retriever, load_index

D = 32


def clustered(n, *, seed=0, noise=0.8):
    """Unit vectors around 30 centres: structured like sentence embeddings, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, D))
    x = centres[rng.integers(0, 30, n)] + noise * rng.normal(size=(n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = clustered(3000)
    rng = np.random.default_rng(1)
    q = x[rng.choice(len(x), 100)] + 0.2 * rng.normal(size=(100, D)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ids = np.arange(len(x), dtype=np.int64) * 3 + 1  # ids that are not row numbers
    ns = ["a" if i % 3 else "b" for i in range(len(x))]
    return x, q, ids, ns


def recall(got, want):
    return np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)])


MAKERS = {
    "exact": lambda: ExactIndex(dim=D),
    "flat": lambda: FaissIndex(dim=D, spec="Flat"),
    "ivf": lambda: FaissIndex(dim=D, spec="IVF32,Flat", nprobe=8),
    "hnsw": lambda: FaissIndex(dim=D, spec="HNSW16", ef_search=64),
    "pq": lambda: FaissIndex(dim=D, spec="IVF16,PQ16x4", nprobe=8),
    # ~4 entries per cell, 64 of ~560 cells rescored: about 9% of the entries are scored exactly
    "pk": lambda: ProductKeyIndex(dim=D, cell_size=4, topk_half=16, n_cells=64),
}
# recall@10 against exact search on `data` (documented in docs/bank.md); PQ is lossy compression by design.
STATED_RECALL = {"flat": 1.0, "ivf": 0.95, "hnsw": 0.95, "pk": 0.9, "pq": 0.5}


def test_flat_equals_exact(data):
    x, q, ids, ns = data
    ex, fl = ExactIndex(dim=D), FaissIndex(dim=D, spec="Flat")
    for idx in (ex, fl):
        idx.add(ids, x, ns)
    for scope in (None, ["a"], ["b", "a"]):
        s1, i1 = ex.search(q, 10, scope)
        s2, i2 = fl.search(q, 10, scope)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, atol=1e-5)
    # brute-force reference for the reference
    want = ids[np.argsort(-(q @ x.T), axis=1)[:, :10]]
    np.testing.assert_array_equal(ex.search(q, 10)[1], want)


@pytest.mark.parametrize("kind", list(STATED_RECALL))
def test_recall_at_10(data, kind):
    x, q, ids, _ = data
    ex, idx = ExactIndex(dim=D), MAKERS[kind]()
    ex.add(ids, x)
    idx.add(ids, x)
    r = recall(idx.search(q, 10)[1], ex.search(q, 10)[1])
    assert r >= STATED_RECALL[kind], f"{kind}: recall@10 {r:.3f}"


@pytest.mark.parametrize("kind", list(MAKERS))
def test_edit_delete_namespaces_save_load(data, kind, tmp_path):
    x, q, ids, ns = data
    idx = MAKERS[kind]()
    idx.add(ids, x, ns)
    target = int(ids[10])
    # edit: the entry gets a new vector; searching for it finds it, at the new place only
    new = clustered(1, seed=99)
    idx.add(np.array([target]), new, ["a"])
    assert len(idx) == len(ids)
    s, i = idx.search(new, 1)
    assert i[0, 0] == target and s[0, 0] == pytest.approx(1.0, abs=1e-3) or kind == "pq"
    # delete: never returned again, whatever the query
    gone = ids[:50]
    assert idx.remove(gone) == 50
    for probe in (x[:50], q):
        _, got = idx.search(probe, 20)
        assert not np.isin(got, gone).any()
    # namespaces: a scoped query returns only that namespace's ids, padded with -1 when short
    ns_of = dict(zip(ids.tolist(), ns))
    ns_of[target] = "a"
    _, got = idx.search(q, 10, ["b"])
    assert {ns_of[int(j)] for j in got.ravel() if j >= 0} == {"b"}
    assert (idx.search(q, 10, ["nope"])[1] == -1).all()
    # save / load give the same results
    idx.save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    for scope in (None, ["a"]):
        a, b = idx.search(q, 10, scope), loaded.search(q, 10, scope)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert not np.isin(loaded.ids(), gone).any() and len(loaded.ids()) == len(ids) - 50


def test_bad_input_and_corrupt_files(data, tmp_path):
    x, q, ids, _ = data
    idx = FaissIndex(dim=D, spec="Flat")
    with pytest.raises(InputError, match=r"shape \(3, 7\), this index expects \(N, 32\)"):
        idx.add(np.arange(3), np.zeros((3, 7), np.float32))
    with pytest.raises(InputError, match="queries have shape"):
        idx.search(np.zeros((2, 5), np.float32), 3)
    with pytest.raises(InputError, match="2 ids for 3 vectors"):
        idx.add(np.arange(2), x[:3])
    idx.add(ids, x)
    idx.save(tmp_path / "ix")
    (tmp_path / "ix" / "shard0000" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexFileError, match="corrupt index shard"):
        load_index(tmp_path / "ix")
    (tmp_path / "ix" / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFileError, match="corrupt manifest"):
        load_index(tmp_path / "ix")
    ExactIndex(dim=D).save(tmp_path / "ex")
    with pytest.raises(IndexFileError, match="not an index folder"):
        load_index(tmp_path / "missing")


@pytest.mark.parametrize(
    "kind,params", [("exact", {}), ("faiss", {"spec": "HNSW16"}), ("faiss", {}), ("pk", {})]
)
def test_retriever_follows_bank_edits(tmp_path, kind, params):
    bank = MemoryBank.create(tmp_path / "b")
    words = ["red", "green", "blue", "amber", "violet", "teal", "olive", "coral"]
    ids = bank.add_many({"text": f"the {w} box holds item {i}", "namespace": "x" if i % 2 else "y"}
                        for i, w in enumerate(words * 30))  # fmt: skip
    enc = HashingEncoder(dim=64)
    r = Retriever.build(bank, enc, kind=kind, **params)
    # edit then search returns the new content
    bank.update(ids[5], text="a zebra sleeps under the moon")
    hits = r.search_entries(["zebra sleeps under the moon"], k=3)[0]
    assert hits[0].entry.id == ids[5] and "zebra" in hits[0].entry.text
    # delete then search never returns it, even for its exact text
    bank.delete(ids[5])
    assert all(h.entry.id != ids[5] for h in r.search_entries(["a zebra sleeps under the moon"], k=20)[0])
    _, got = r.search(["the red box holds item 0"], k=len(ids))
    assert ids[5] not in got
    # namespaces scope
    assert {h.entry.namespace for h in r.search_entries(["the red box"], k=20, namespaces=["x"])[0]} == {"x"}
    # save, edit in another handle, reopen: the saved index is refreshed from the log
    r.save("ix")
    with MemoryBank.open(tmp_path / "b") as other:
        other.update(ids[6], text="an owl reads quietly")
        other.delete(ids[7])
    r2 = Retriever.open(bank, enc, name="ix")
    assert r2.search_entries(["an owl reads quietly"], k=1)[0][0].entry.id == ids[6]
    assert ids[7] not in r2.search(["the violet box holds item 7"], k=50)[1]
    assert bank.verify() == []
    r2.save("ix")
    assert bank.verify() == []
    # a different encoder means the saved vectors are invalid: rebuilt, not reused
    r3 = Retriever.open(bank, HashingEncoder(dim=48), name="ix")
    assert r3.index.dim == 48 and len(r3.index) == bank.count()


def test_product_keys_follow_a_growing_bank():
    """A bank grown from 1 entry by 5 x 1,000 re-learns its codebooks: real cells, recall of a fresh build."""
    import math

    x = clustered(5001, seed=3)
    ids = np.arange(len(x), dtype=np.int64)
    rng = np.random.default_rng(4)
    q = x[rng.choice(len(x), 200)] + 0.2 * rng.normal(size=(200, D)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ex = ExactIndex(dim=D)
    ex.add(ids, x)
    want = ex.search(q, 10)[1]

    def make():
        return ProductKeyIndex(dim=D, cell_size=4, topk_half=16, n_cells=64)

    grown, fresh = make(), make()
    grown.add(ids[:1], x[:1])
    for s in range(1, len(x), 1000):
        grown.add(ids[s : s + 1000], x[s : s + 1000], replace=False)
    fresh.add(ids, x)
    g, f = grown.shards["default"], fresh.shards["default"]
    # learned again at 1,001 and 3,001 entries: within sqrt(2) of the fresh codebook size, never one cell
    assert g.n_keys >= f.n_keys / math.sqrt(2) and g.learned_on == 3001
    r_grown, r_fresh = recall(grown.search(q, 10)[1], want), recall(fresh.search(q, 10)[1], want)
    assert r_grown >= r_fresh - 0.02, (r_grown, r_fresh)
    # drift: replacing every entry (an edit is remove + add) re-learns too
    before = g.learned_on
    for s in range(0, len(x), 1000):
        grown.add(ids[s : s + 1000], clustered(len(ids[s : s + 1000]), seed=9 + s))
    assert g.learned_on == len(x) and before != g.learned_on and len(grown) == len(x)


def test_retriever_rebuilds_an_index_the_bank_has_outgrown(tmp_path):
    """An IVF index first built on a bank too small to train it (so Flat) becomes IVF once the bank has grown."""
    bank = MemoryBank.create(tmp_path / "b")
    bank.add_many(
        {"text": f"Person {i} lives in town {i % 13} and works at firm {i % 7}."} for i in range(10)
    )
    r = Retriever.build(bank, HashingEncoder(dim=D), kind="faiss", spec="IVF16,Flat", nprobe=16)
    assert r.index.shards["default"].built_spec == "Flat" and r.rebuilds == 1
    for step in range(25):  # small edits: none of them alone is worth a rebuild
        bank.add_many({"text": f"Person {step}-{i} lives in town {i % 13}."} for i in range(100))
        r.search(["Person 3 lives in town 3"], k=3)
    assert r.rebuilds == 2 and r.index.meta["built_on"] >= 1021
    assert r.index.shards["default"].built_spec == "IVF16,Flat" and len(r.index) == bank.count()
