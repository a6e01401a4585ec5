"""Ingestion: facts, triples and text chunks in; every kind of bad input named by file, line, field; nothing written."""

import json

import pytest

from memlm.data.annotate import parse_calls, strip_calls
from memlm.data.facts import iter_facts
from memlm.data.ingest import IngestConfig, chunk_text, ingest
from memlm.errors import InputError


def test_facts_triples_and_text(tmp_path):
    (tmp_path / "facts.jsonl").write_text(
        json.dumps({"subject": "Zürich", "relation": "country", "object": "Switzerland"})
        + "\n\n"
        + json.dumps(["Ada", "birth_city", "Paris"])
        + "\n"
        + json.dumps(
            {"subject": "Bo", "relation": "r", "object": "x", "text": "Bo likes x.", "namespace": "n"}
        )
        + "\n",
        encoding="utf-8",
    )
    words = " ".join(f"word{i}" for i in range(300))
    (tmp_path / "notes.md").write_text("# Notes\n\n" + words + "\n", encoding="utf-8")
    out = tmp_path / "out"
    meta = ingest(
        [tmp_path / "facts.jsonl", tmp_path / "notes.md"], out, IngestConfig(chunk_size=100, overlap=20)
    )
    facts = list(iter_facts(out / "facts.jsonl"))
    assert [(f.subject, f.relation, f.object) for f in facts] == [
        ("Zürich", "country", "Switzerland"),
        ("Ada", "birth_city", "Paris"),
        ("Bo", "r", "x"),
    ]
    assert facts[0].text == "The country of Zürich is Switzerland." and facts[0].namespace == "default"
    assert facts[2].namespace == "n" and facts[1].source.endswith("facts.jsonl:3")
    entries = [json.loads(x) for x in (out / "entries.jsonl").read_text().splitlines()]
    assert meta["counts"] == {"facts": 3, "entries": len(entries)} and len(entries) > 20
    assert all(len(e["text"]) <= 100 for e in entries)
    assert "word0" in entries[0]["text"] and "word299" in entries[-1]["text"]
    lmlm = [json.loads(x)["text"] for x in (out / "corpus/train_lmlm.jsonl").read_text().splitlines()]
    plain = [json.loads(x)["text"] for x in (out / "corpus/train.jsonl").read_text().splitlines()]
    assert [strip_calls(t) for t in lmlm] == plain
    assert parse_calls(lmlm[0])[0].value == "Switzerland"


def test_chunks_cover_text_with_overlap():
    text = " ".join(f"w{i}" for i in range(200))
    chunks = chunk_text(text, chunk_size=50, overlap=10)
    assert all(len(c.text) <= 50 for c in chunks)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start <= a.end  # no gap
        assert b.start < a.end  # overlap
    long = chunk_text("x" * 120, chunk_size=50, overlap=10)
    assert [c.text for c in long] == ["x" * 50, "x" * 50, "x" * 20]


GOOD = json.dumps({"subject": "a", "relation": "b", "object": "c"})


@pytest.mark.parametrize(
    "content, line, field",
    [
        (GOOD + "\n{not json\n", 2, None),
        (GOOD + "\n" + json.dumps({"subject": "a", "object": "c"}) + "\n", 2, "relation"),
        (json.dumps({"subject": "a", "relation": "b", "object": 3}) + "\n", 1, "object"),
        (json.dumps({"subject": "a", "relation": "b", "object": "c", "aliases": "x"}) + "\n", 1, "aliases"),
        (json.dumps(["a", "b"]) + "\n", 1, None),
        (GOOD.encode() + b"\n" + GOOD.encode() + b"\n\xff\xfe broken\n", 3, None),
        ("", None, None),
        ("\n  \n", None, None),
    ],
)
def test_bad_input_names_file_line_field_and_writes_nothing(tmp_path, content, line, field):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        ingest([path], out)
    assert str(path) in str(err.value)
    assert (err.value.line, err.value.field) == (line, field)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


def test_bad_text_file_and_existing_output_kept(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"fine line\n\xc3\x28 bad\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(InputError) as err:
        ingest([tmp_path / "a.txt"], out)
    assert err.value.line == 2 and "UTF-8" in str(err.value)
    assert (out / "keep.txt").read_text() == "old"
    with pytest.raises(InputError):
        ingest([tmp_path / "missing.jsonl"], out)
    with pytest.raises(InputError):
        ingest([tmp_path / "a.csv"], out)


def test_bad_config():
    with pytest.raises(ValueError):
        IngestConfig(chunk_size=10, overlap=10)
