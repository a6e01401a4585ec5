"""bios: determinism, unique names, held-out question templates, disjoint splits, edit and deletion sets."""

import json
import re
from pathlib import Path

import pytest

from memlm.data.benchmark import BenchmarkConfig
from memlm.data.bios import CHUNK, TEMPLATES, BiosConfig, generate_bios, name_capacity, person_name
from memlm.data.facts import apply_edits, iter_facts


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def bios_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bios") / "b"
    generate_bios(out, BiosConfig(people=1000, seed=3))
    return out


def test_same_seed_gives_byte_identical_files(bios_dir, tmp_path):
    again = tmp_path / "again"
    generate_bios(again, BiosConfig(people=1000, seed=3))
    assert _files(again) == _files(bios_dir)
    other = tmp_path / "other"
    generate_bios(other, BiosConfig(people=1000, seed=4))
    assert _files(other)["facts.jsonl"] != _files(bios_dir)["facts.jsonl"]


def test_workers_do_not_change_the_bytes(tmp_path):
    n = CHUNK + 500  # two chunks, so the pool really splits the work
    cfg = BenchmarkConfig(seed=1, low_data=(10,), lmlm=False, docs_per_entity=1, qa_docs=False)
    generate_bios(tmp_path / "one", BiosConfig(people=n, seed=1, workers=1), cfg)
    generate_bios(tmp_path / "two", BiosConfig(people=n, seed=1, workers=2), cfg)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_names_are_unique(bios_dir):
    facts = list(iter_facts(bios_dir / "facts.jsonl"))
    assert len(facts) == 6000
    names = {f.subject for f in facts}
    assert len(names) == 1000
    assert len({(f.subject, f.relation) for f in facts}) == len(facts)
    # By construction over the whole code space, not only for the sampled people.
    codes = list(range(0, name_capacity(), 997))
    assert len({person_name(c) for c in codes}) == len(codes)


def _training_text(root: Path) -> str:
    return "\n".join(d["text"] for p in sorted((root / "corpus").glob("*.jsonl")) for d in _jsonl(p))


def test_no_question_template_appears_in_training_text(bios_dir):
    train = _training_text(bios_dir)
    assert "Q: " in train  # the corpus does drill the QA format ...
    for rel, templates in TEMPLATES.eval_questions.items():
        assert not set(templates) & set(TEMPLATES.train_questions[rel])
        for t in templates:
            head = t.split("{s}")[0]
            assert len(head.split()) >= 3 and head not in train, (rel, t)
    questions = [r["question"] for s in ("seen", "unseen") for r in _jsonl(bios_dir / f"qa/{s}.jsonl")]
    assert len(questions) == 6000
    drilled = set(re.findall(r"Q: (.*?)\nA:", train))
    assert len(drilled) > 1000 and not drilled & set(questions)  # ... but never with an evaluation template
    assert not [q for q in questions[::20] if q in train]  # nor anywhere else in the text


def test_splits_do_not_overlap(bios_dir):
    read = lambda name: (bios_dir / "splits" / name).read_text().splitlines()  # noqa: E731
    seen, unseen = set(read("seen.txt")), set(read("unseen.txt"))
    assert len(seen) == len(unseen) == 500 and not seen & unseen
    low = {p: set(read(f"low_{p}.txt")) for p in (1, 10, 100)}
    assert [len(low[p]) for p in (1, 10, 100)] == [10, 100, 1000]
    assert low[1] <= low[10] <= low[100] == seen | unseen
    # Unseen people never appear in the main training corpus; seen people all do.
    train = "\n".join(d["text"] for d in _jsonl(bios_dir / "corpus/train.jsonl"))
    assert all(name not in train for name in unseen)
    assert all(name in train for name in seen)
    low1 = "\n".join(d["text"] for d in _jsonl(bios_dir / "corpus/low_1.jsonl"))
    assert {n for n in low[100] if n in low1} == low[1]
    for split, people in (("seen", seen), ("unseen", unseen)):
        assert {r["subject"] for r in _jsonl(bios_dir / f"qa/{split}.jsonl")} == people


def test_edit_set_changes_exactly_the_listed_facts(bios_dir):
    facts = list(iter_facts(bios_dir / "facts.jsonl"))
    edits = _jsonl(bios_dir / "edits.jsonl")
    assert 0.05 * len(facts) < len(edits) < 0.15 * len(facts)
    edited = apply_edits(facts, edits)
    changed = {i for i, (a, b) in enumerate(zip(facts, edited)) if a != b}
    assert changed == {e["fact_id"] for e in edits}
    for e in edits:
        assert edited[e["fact_id"]].object == e["object"] != e["old_object"] == facts[e["fact_id"]].object
        assert e["object"] in edited[e["fact_id"]].text
    qa = {r["fact_id"]: r for r in _jsonl(bios_dir / "qa/edited.jsonl")}
    assert set(qa) == {e["fact_id"] for e in edits}
    assert all(qa[e["fact_id"]]["answer"] == e["object"] for e in edits)
    deleted = {d["fact_id"] for d in _jsonl(bios_dir / "deletions.jsonl")}
    assert deleted and not deleted & set(qa)


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        BiosConfig(people=0)
    with pytest.raises(ValueError):
        BenchmarkConfig(edit_share=0.8, delete_share=0.5)


def test_every_line_is_canonical_json(bios_dir):
    """Sorted keys, no ASCII escaping: the hand-written fast encoders agree with json.dumps."""
    for path in sorted(bios_dir.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines()[:3000]:
            assert json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False) == line, path
