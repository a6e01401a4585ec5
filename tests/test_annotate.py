"""LMLM annotation: calls before values, and a loss mask that removes exactly the value tokens and <|db_end|>."""

import json

import pytest

from memlm.data.annotate import annotate_ids, call_string, parse_calls, render, strip_calls
from memlm.data.benchmark import BenchmarkConfig
from memlm.data.bios import BiosConfig, generate_bios
from memlm.tokenizer import DB_END, DB_ENTITY, DB_RETURN, Tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("bios") / "b"
    generate_bios(out, BiosConfig(people=200, seed=0), BenchmarkConfig(seed=0, low_data=()))
    plain = [json.loads(x)["text"] for x in (out / "corpus/train.jsonl").read_text().splitlines()]
    lmlm = [json.loads(x)["text"] for x in (out / "corpus/train_lmlm.jsonl").read_text().splitlines()]
    facts = [json.loads(x) for x in (out / "facts.jsonl").read_text().splitlines()]
    return plain, lmlm, facts


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train(corpus[0] + corpus[1], vocab_size=600)


def test_render_puts_the_call_before_the_value():
    plain, annotated = render("{s} was born in {o}.", "Ada Smith", "birth_city", "Paris")
    assert plain == "Ada Smith was born in Paris."
    assert annotated == "Ada Smith was born in" + call_string("Ada Smith", "birth_city", "Paris") + " Paris."
    assert annotated.count(DB_ENTITY) == 1 and strip_calls(annotated) == plain
    [call] = parse_calls(annotated)
    assert (call.entity, call.relation, call.value) == ("Ada Smith", "birth_city", "Paris")


def test_lmlm_corpus_is_the_plain_corpus_plus_calls(corpus):
    plain, lmlm, facts = corpus
    assert len(plain) == len(lmlm)
    assert [strip_calls(a) for a in lmlm] == plain
    known = {(f["subject"], f["relation"]): f["object"] for f in facts}
    calls = [c for a in lmlm for c in parse_calls(a)]
    assert len(calls) > len(lmlm)
    assert all(known[(c.entity, c.relation)] == c.value for c in calls)


def test_mask_removes_exactly_value_tokens_and_db_end(corpus, tok):
    _, lmlm, _ = corpus
    end_id = tok.token_id(DB_END)
    for text in lmlm[:200]:
        ids, mask = annotate_ids(tok, text)
        assert ids == tok.encode(text) and len(mask) == len(ids)
        masked = [i for i, m in zip(ids, mask) if not m]
        expected = []
        for c in parse_calls(text):
            expected += tok.encode(" " + c.value) + [end_id]
        assert masked == expected
        # The unmasked tokens decode to the text with every " V<|db_end|>" cut out of its calls.
        kept = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        assert kept == _without_values(text)


def _pack(docs, eos_id, seq_len):
    """Concatenate (ids, mask) per document with EOS between, cut into (inputs, targets, target_mask)."""
    ids, mask = [], []
    for d_ids, d_mask in docs:
        ids += d_ids + [eos_id]
        mask += d_mask + [True]
    out = []
    for start in range(0, len(ids) - 1, seq_len):
        chunk = ids[start : start + seq_len + 1]
        out.append((chunk[:-1], chunk[1:], mask[start + 1 : start + seq_len + 1]))
    return out


def _without_values(text: str) -> str:
    for c in parse_calls(text):
        text = text.replace(f"{DB_RETURN} {c.value}{DB_END}", DB_RETURN, 1)
    return text


def test_packing_cuts_never_expose_a_value_token(corpus, tok):
    _, lmlm, _ = corpus
    docs = [annotate_ids(tok, t) for t in lmlm[:100]]
    end_id, ret_id = tok.token_id(DB_END), tok.token_id(DB_RETURN)
    for seq_len in (7, 16, 33):  # lengths that cut calls at many different points
        seqs = _pack(docs, tok.eos_id, seq_len)
        assert any(ret_id in inp[-3:] for inp, _, _ in seqs)  # some cut does fall inside a call
        targets = [t for _, tgt, m in seqs for t, keep in zip(tgt, m) if keep]
        assert end_id not in targets
        # Decoding the trainable targets gives the documents with every value cut out of its call.
        eos = tok.decode([tok.eos_id], skip_special_tokens=False)
        want = eos.join(_without_values(t) for t in lmlm[:100]) + eos
        first = tok.decode(docs[0][0][:1], skip_special_tokens=False)
        assert tok.decode(targets, skip_special_tokens=False) == want.removeprefix(first)
        for inputs, _, m in seqs:
            # The target right after <|db_return|> is the first value token: always masked.
            assert all(not m[k] for k, t in enumerate(inputs) if t == ret_id)


def test_foundation_packer_keeps_values_out_of_the_targets(corpus, tok, tmp_path):
    from memlm.data.pack import IGNORE_INDEX, PackedDataset, pack_documents

    _, lmlm, _ = corpus
    docs = [annotate_ids(tok, t) for t in lmlm[:100]]
    pack_documents(docs, tmp_path / "packed", eos_id=tok.eos_id, vocab_size=tok.vocab_size)
    ds = PackedDataset(tmp_path / "packed", seq_len=13)
    targets = [int(t) for i in range(len(ds)) for t in ds[i][1] if t != IGNORE_INDEX]
    assert tok.token_id(DB_END) not in targets
    eos = tok.decode([tok.eos_id], skip_special_tokens=False)
    first = tok.decode(docs[0][0][:1], skip_special_tokens=False)
    want = (eos.join(_without_values(t) for t in lmlm[:100]) + eos).removeprefix(first)
    got = tok.decode(targets, skip_special_tokens=False)
    assert len(got) > 0.9 * len(want) and want.startswith(got)
