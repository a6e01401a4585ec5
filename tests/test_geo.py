"""geo: real GeoNames facts with missing fields, duplicate city names and non-ASCII names handled."""

import json
from collections import Counter
from pathlib import Path

import pytest

from memlm.data.facts import iter_facts
from memlm.data.geo import TEMPLATES, GeoConfig, ascii_fold, generate_geo, load_entities


@pytest.fixture(scope="module")
def entities():
    return load_entities(GeoConfig())


@pytest.fixture(scope="module")
def geo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("geo") / "g"
    generate_geo(out, GeoConfig(max_cities=300))
    return out


def test_subjects_unique_and_duplicates_disambiguated(entities):
    subjects = [s for s, _, _ in entities]
    assert len(set(subjects)) == len(subjects) > 20_000
    facts = {s: dict(f) for s, f, _ in entities}
    assert facts["France"]["capital"] == "Paris" and facts["France"]["continent"] == "Europe"
    assert "French" in facts["France"]["languages"] and "Spain" in facts["France"]["neighbours"]
    assert facts["Japan"]["currency"] == "Yen"
    # Nine cities named Victoria: none keeps the bare name, and each says where it is.
    victorias = [s for s in subjects if s.startswith("Victoria (")]
    assert "Victoria" not in subjects and len(victorias) >= 5
    springfields = [s for s in subjects if s.startswith("Springfield (")]
    assert any("Illinois, United States" in s for s in springfields)
    assert facts["Springfield (Illinois, United States)"]["region"] == "Illinois"
    # A city named like its country is told apart from the country.
    assert "Luxembourg (Luxembourg)" in facts and "capital" in facts["Luxembourg"]


def test_missing_fields_give_no_fact_and_non_ascii_names_kept(entities):
    facts = {s: dict(f) for s, f, _ in entities}
    assert "capital" not in facts.get("Antarctica", {})
    assert all(obj.strip() for _, f, _ in entities for _, obj in f)
    assert all(len({r for r, _ in f}) == len(f) for _, f, _ in entities)
    aliases = {s: a for s, _, a in entities}
    assert "Zurich" in aliases["Zürich"] and facts["Zürich"]["country"] == "Switzerland"
    assert ascii_fold("São Paulo") == "Sao Paulo"
    assert Counter(r for _, f, _ in entities for r, _ in f)["region"] > 1000  # US cities only


def test_files_and_splits_like_bios(geo_dir, tmp_path):
    facts = list(iter_facts(geo_dir / "facts.jsonl"))
    assert {f.relation for f in facts} == set(TEMPLATES.statements)
    assert all(f.namespace == "geo" for f in facts)
    seen = set((geo_dir / "splits/seen.txt").read_text(encoding="utf-8").splitlines())
    unseen = set((geo_dir / "splits/unseen.txt").read_text(encoding="utf-8").splitlines())
    assert seen and unseen and not seen & unseen and seen | unseen == {f.subject for f in facts}
    qa = [
        json.loads(x)
        for s in ("seen", "unseen")
        for x in (geo_dir / f"qa/{s}.jsonl").read_text().splitlines()
    ]
    assert len(qa) == len(facts) and all(facts[r["fact_id"]].object == r["answer"] for r in qa)
    train = (geo_dir / "corpus/train.jsonl").read_text(encoding="utf-8") + (
        geo_dir / "corpus/low_100.jsonl"
    ).read_text(encoding="utf-8")
    train = "\n".join(json.loads(x)["text"] for x in train.splitlines())
    assert not [r["question"] for r in qa if r["question"] in train]
    again = tmp_path / "again"
    generate_geo(again, GeoConfig(max_cities=300))
    for p in sorted(geo_dir.rglob("*")):
        if p.is_file():
            assert (again / p.relative_to(geo_dir)).read_bytes() == p.read_bytes(), p


def test_lines_are_canonical_json_with_aliases(geo_dir):
    lines = (geo_dir / "facts.jsonl").read_text(encoding="utf-8").splitlines()
    assert any('"aliases"' in x for x in lines) and any(not x.isascii() for x in lines)
    for path in sorted(geo_dir.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            assert json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False) == line, path
