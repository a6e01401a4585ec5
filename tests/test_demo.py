"""`memlm demo` end to end on a tiny config: answers with real sources, an edit and a deletion on a bank copy
(the original bank untouched), the comparison table, and a second run that reuses the trained models."""

import hashlib

import pytest

from memlm.bank.store import MemoryBank
from memlm.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow


def _digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith("-shm")}  # fmt: skip


def test_tiny_demo_end_to_end(tmp_path):
    cfg = DemoConfig(
        out_dir=str(tmp_path / "demo"), people=12, steps=3, batch_size=4, block_size=256, questions=6, show=3,
        model={"vocab_size": 300, "n_layer": 1, "n_head": 2, "n_embd": 32}, encoder="hashing:64",
        design="rag", design_options={"k": 1, "encoder": "hashing:64", "key": "about"},
    )  # fmt: skip
    lines: list[str] = []
    results = run_demo(cfg, out=lines.append, progress=False)
    root = tmp_path / "demo"
    shown = results["showcase"]
    with MemoryBank.open(root / "banks" / "bios", readonly=True) as bank:
        for row in shown["unseen"]:  # provenance: real entries of the bank, about the person asked
            (eid,) = row["used"]
            assert bank.get(eid).subject in row["question"]
        edit, gone = shown["edit"], shown["delete"]
        original_text = bank.get(edit["entry"]).text
        assert edit["old"] in original_text and bank.get(gone["entry"]) is not None  # original untouched
    with MemoryBank.open(root / "showcase" / "bank", readonly=True) as copy:
        assert edit["new"] in copy.get(edit["entry"]).text  # the edit landed in the copy
        assert gone["entry"] not in copy
    assert any("== edit:" in ln for ln in lines) and any("== delete:" in ln for ln in lines)
    table = lines[lines.index(next(ln for ln in lines if "== dense vs memory" in ln)) + 1]
    assert "dense" in table and "rag" in table
    cells = results["benchmarks"]["bios"]
    assert {"none", "rag"} <= set(cells) and "edit" in cells["rag"]["train"]

    # Again: the trained models are reused and the showcase edits a fresh copy of the untouched bank.
    bank_files = _digest(root / "banks" / "bios")
    finals = {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("final/model.safetensors")}
    again = run_demo(cfg, out=lambda _: None, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in finals.items()) and len(finals) == 2
    assert again["showcase"]["edit"]["old"] == edit["old"]  # before: the original value again
    assert _digest(root / "banks" / "bios") == bank_files
