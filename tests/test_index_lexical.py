"""LMLM lookups: exact key, alias, fuzzy with threshold; namespaces; deleted facts leave nothing to find."""

import pytest

from memlm.bank import MemoryBank
from memlm.encode import HashingEncoder
from memlm.index import LexicalIndex


@pytest.fixture
def bank(tmp_path):
    with MemoryBank.create(tmp_path / "b") as b:
        b.add(
            subject="France", relation="capital", object="Paris", namespace="geo", aliases=["French Republic"]
        )
        b.add(subject="France", relation="currency", object="Euro", namespace="geo")
        b.add(subject="Marie Curie", relation="birth city", object="Warsaw", namespace="bios")
        b.add(subject="Marie Curie", relation="birth date", object="7 November 1867", namespace="bios")
        yield b


def test_exact_alias_fuzzy(bank):
    lex = LexicalIndex(bank, HashingEncoder(dim=256), threshold=0.5)
    hit = lex.lookup("  FRANCE ", "Capital")
    assert (hit.how, hit.entry.object) == ("exact", "Paris")
    assert lex.lookup("french republic", "capital").how == "alias"
    hit = lex.lookup("Marie Curi", "birth city")
    assert (hit.how, hit.entry.object) == ("fuzzy", "Warsaw")  # the relation decides between close keys
    assert lex.lookup("Marie Curi", "birth date").entry.object == "7 November 1867"
    assert lex.lookup("Zanzibar", "anthem") is None
    assert LexicalIndex(bank, None).lookup("Marie Curi", "birth city") is None  # no encoder: no fuzzy


def test_namespaces_scope_lookups(bank):
    lex = LexicalIndex(bank, HashingEncoder(dim=256), threshold=0.5)
    assert lex.lookup("France", "capital", namespaces=["bios"]) is None
    assert lex.lookup("french republic", "capital", namespaces=["bios"]) is None
    assert lex.lookup("Marie Curi", "birth city", namespaces=["geo"]) is None
    assert lex.lookup("France", "capital", namespaces=["geo", "bios"]).entry.object == "Paris"


def test_deleted_fact_cannot_be_found_any_way(bank):
    lex = LexicalIndex(bank, HashingEncoder(dim=256), threshold=0.3)
    assert lex.lookup("France", "capital").entry.object == "Paris"  # builds the fuzzy index first
    paris = lex.lookup("France", "capital").entry.id
    bank.delete(paris)
    for subject in ("France", "french republic", "Frnce", "French Repub"):
        hit = lex.lookup(subject, "capital")
        assert hit is None or hit.entry.id != paris, (subject, hit)
    assert (
        bank.connection.execute("SELECT COUNT(*) FROM aliases WHERE entry_id=?", (paris,)).fetchone()[0] == 0
    )
    # edits are seen too: the new subject is found, the old one no longer
    curie = lex.lookup("Marie Curie", "birth city").entry.id
    bank.update(curie, subject="Maria Sklodowska")
    assert lex.lookup("Maria Sklodowska", "birth city").entry.id == curie
    hit = lex.lookup("Marie Curie", "birth city")
    assert hit is None or hit.how == "fuzzy"


def test_fuzzy_index_encodes_each_name_once(bank):
    """Every entry of a subject is keyed by the same name: it is encoded once, not once per entry."""
    seen: list[str] = []

    class Counting(HashingEncoder):
        def encode(self, texts, **kw):
            seen.extend(texts)
            return super().encode(texts, **kw)

    lex = LexicalIndex(bank, Counting(dim=256), threshold=0.5)
    assert lex.lookup("Marie Curi", "birth city").entry.object == "Warsaw"
    names = {"France", "French Republic", "Marie Curie"}
    assert sorted(seen) == sorted([*names, "Marie Curi"])  # three names and the query, each once
    bank.add(subject="Marie Curie", relation="award", object="Nobel Prize", namespace="bios")
    assert lex.lookup("Marie Curi", "award").entry.object == "Nobel Prize"  # the edit is followed
