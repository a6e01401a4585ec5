"""The memory path through the command line: train RAG with a bank, generate with sources, evaluate QA,
edits and deletions on a copy (the original bank stays byte-identical), swap the bank, clear bank errors."""

import gc
import hashlib
import json
from pathlib import Path

import pytest

from memlm.bank.store import MemoryBank
from memlm.cli import main

pytestmark = pytest.mark.slow


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, memory_train_args):
    root = tmp_path_factory.mktemp("rag")
    data, bank, out = root / "bios", root / "bank", root / "run"
    assert main(["data", "bios", "--people", "24", "--seed", "0", "--out", str(data)]) == 0
    assert main(["bank", "create", str(bank)]) == 0
    assert main(["bank", "import", str(bank), str(data / "facts.jsonl")]) == 0
    args = memory_train_args(
        "rag", '{"k": 2, "encoder": "hashing:64", "swap_prob": 0.5}', data / "corpus/train.jsonl", bank, out
    )
    assert main(args) == 0
    return data, bank, out


def test_run_records_its_bank(run):
    data, bank, out = run
    record = json.loads((out / "final" / "memory.json").read_text())
    with MemoryBank.open(bank) as b:
        assert record["design"] == "rag"
        assert record["bank"]["fingerprint"] == b.content_fingerprint() and record["bank"]["entries"] == len(
            b
        )
    assert json.loads((out / "memory.json").read_text()) == record
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert json.loads((ckpt / "memory.json").read_text()) == record


def test_generate_shows_the_entries_each_answer_used(run, capsys):
    data, bank, out = run
    prompt = json.loads((data / "qa/unseen.jsonl").read_text().splitlines()[0])["prompt"]
    assert main(["generate", "--model", str(out / "final"), "--prompt", prompt, "--sources",
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "sources (2):" in text
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("[")]
    with MemoryBank.open(bank) as b:
        for line in lines:
            eid, entry_text = line[1:].split("] ", 1)
            assert b.get(int(eid)).text == entry_text  # real ids of the bank used


def test_eval_qa_records_provenance(run, capsys):
    data, bank, out = run
    assert main(["eval", "qa", "--model", str(out / "final"), "--data", str(data), "--split", "unseen",
                 "--limit", "12", "--max-new-tokens", "4"]) == 0  # fmt: skip
    report = json.loads((out / "final/eval/qa_unseen.json").read_text())
    assert report["retrieval"]["n"] == 12 and 0 <= report["retrieval"]["hit_rate"] <= 1
    assert report["bank"] == str(bank)
    preds = [json.loads(x) for x in (out / "final/eval/qa_unseen_predictions.jsonl").read_text().splitlines()]
    with MemoryBank.open(bank) as b:
        assert all(len(p["retrieved"]) == 2 and all(i in b for i in p["retrieved"]) for p in preds)
        hits = [p["hit"] for p in preds]
        ids = {(e.subject, e.relation): e.id for e in b}
    qa = [json.loads(x) for x in (data / "qa/unseen.jsonl").read_text().splitlines()[:12]]
    assert hits == [ids[(q["subject"], q["relation"])] in p["retrieved"] for q, p in zip(qa, preds)]


def test_edit_and_delete_never_touch_the_original_bank(run, capsys):
    data, bank, out = run
    gc.collect()  # connections of earlier tests close (and checkpoint their WAL) now, not mid-test
    before = digest(bank)
    assert main(["eval", "edit", "--model", str(out / "final"), "--data", str(data), "--limit", "6",
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    assert main(["eval", "delete", "--model", str(out / "final"), "--data", str(data), "--limit", "6",
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    gc.collect()
    assert digest(bank) == before
    edit = json.loads((out / "final/eval/edit.json").read_text())
    delete = json.loads((out / "final/eval/delete.json").read_text())
    assert edit["edits"] == 6 and edit["training_steps"] == 0 and edit["visible_after_s"] > 0
    assert 0 <= edit["new_value_rate"] <= 1 and 0 <= edit["others_unchanged"] <= 1
    assert delete["deletions"] == 6 and delete["deleted_entries_read_after"] == 0
    parts = delete["leak_by_entity"]  # every question is counted on its entity's side, and the sides add up
    assert sum(v["n"] for v in parts.values()) == delete["questions"]
    assert sum(v["leak"] * v["n"] for v in parts.values()) == pytest.approx(
        delete["leak"] * delete["questions"]
    )
    text = capsys.readouterr().out
    assert "no training step" in text and "still answered (leak)" in text


def test_bank_errors_are_one_line(run, tmp_path, capsys):
    data, bank, out = run
    prompt = "Q: Where was Ada born?\nA:"
    assert main(["generate", "--model", str(out / "final"), "--prompt", prompt, "--bank", str(tmp_path)]) == 2
    assert "not a memlm bank" in capsys.readouterr().err
    assert main(["eval", "qa", "--model", str(out / "final"), "--data", str(data), "--bank",
                 str(tmp_path / "nope")]) == 2  # fmt: skip
    assert "not a memlm bank" in capsys.readouterr().err
