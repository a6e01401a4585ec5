"""Search by table row (memlm.model.memory.row_index.RowIndex: PlugLM's keys, the question's search): exact
torch and FAISS agree, edits and deletions reach it, and ``auto`` moves to FAISS at its threshold."""

import pytest
import torch
import torch.nn.functional as F

from memlm.errors import ConfigError
from memlm.model.memory import row_index
from memlm.model.memory.row_index import RowIndex


def _vectors(n: int, dim: int = 24, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _edited(index: str) -> RowIndex:
    """400 rows set, rows 0..49 removed, rows 50..99 replaced, 10 new rows past the end (row 400 skipped)."""
    t = RowIndex(24, index=index)
    t.set(torch.arange(400), _vectors(400))
    t.remove(torch.arange(50))
    t.set(torch.arange(50, 100), _vectors(50, seed=1))
    t.set(torch.arange(401, 411), _vectors(10, seed=2))
    return t


def test_text_index_faiss_gives_exact_search_results_through_edits():
    exact, faiss = _edited("exact"), _edited("faiss")
    assert faiss.uses_faiss and not exact.uses_faiss
    assert len(exact) == len(faiss) == 360
    queries = torch.cat([_vectors(30, seed=1)[:20], _vectors(10, seed=2), _vectors(20, seed=3)])
    s_exact, r_exact = exact.search(queries, 5)
    s_faiss, r_faiss = faiss.search(queries, 5)
    assert torch.equal(r_exact, r_faiss)
    torch.testing.assert_close(s_exact, s_faiss)
    assert torch.equal(r_exact[:20, 0], torch.arange(50, 70))  # a replaced row is found by its new vector
    assert torch.equal(r_exact[20:30, 0], torch.arange(401, 411))  # rows past the old end are found
    everything = exact.search(queries, 411)[1]
    for r in (*range(50), 400):  # removed, never set: never found
        assert r not in everything.tolist()
    assert torch.equal(exact.vectors[:50], torch.zeros(50, 24))


def test_text_index_pads_past_the_live_rows():
    t = RowIndex(24, index="exact")
    t.set(torch.tensor([3, 7]), _vectors(2))
    scores, rows = t.search(_vectors(1), 4)
    assert sorted(rows[0, :2].tolist()) == [3, 7] and rows[0, 2:].tolist() == [-1, -1]
    assert torch.isinf(scores[0, 2:]).all()


def test_text_index_auto_moves_to_faiss_at_its_threshold(monkeypatch):
    monkeypatch.setattr(row_index, "FAISS_FROM", 100)
    t = RowIndex(24, index="auto")
    t.set(torch.arange(99), _vectors(120)[:99])
    assert not t.uses_faiss
    t.set(torch.arange(99, 120), _vectors(120)[99:])
    assert t.uses_faiss
    queries = _vectors(120)[::7]
    assert torch.equal(t.search(queries, 1)[1][:, 0], torch.arange(0, 120, 7))
    with pytest.raises(ConfigError, match="index must be"):
        RowIndex(24, index="hnsw")
