"""Packing: text round-trips through the token files, masks survive window cuts, bad input is named."""

import json
import os

import numpy as np
import pytest
import torch

from memlm.data.pack import IGNORE_INDEX, PackedDataset, build_packed, in_val_split, pack_documents
from memlm.data.text import iter_documents
from memlm.errors import InputError
from memlm.tokenizer import Tokenizer

DOCS = [f"Person {i} was born in city {i % 7} and works at company {i % 5}." for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(DOCS * 3, vocab_size=300)


def test_text_formats(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\n\n  \nsecond doc\n", encoding="utf-8")
    assert list(iter_documents(txt)) == ["first doc", "second doc"]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "one\\ntwo", "id": 1}\n\n{"text": "three"}\n', encoding="utf-8")
    assert list(iter_documents(jsonl)) == ["one\ntwo", "three"]


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ("{not json", None, "invalid JSON"),
        ("[1, 2]", None, "JSON object"),
        ('{"txt": "x"}', "text", "missing"),
        ('{"text": 3}', "text", "string"),
    ],
)
def test_bad_jsonl_names_file_line_field(tmp_path, line, field, words):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        list(iter_documents(path))
    err = info.value
    assert (err.line, err.field) == (2, field)
    assert str(path) in str(err) and ":2:" in str(err) and words in str(err)


def test_unsupported_suffix(tmp_path):
    with pytest.raises(InputError, match="unsupported"):
        list(iter_documents(tmp_path / "x.csv"))


def test_pack_round_trips_text(tmp_path, tokenizer):
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    out = build_packed([src], tmp_path / "packed", tokenizer, progress=False)
    ds = PackedDataset(out, seq_len=16)
    assert ds.tokens.dtype == np.uint16
    pieces = tokenizer.decode(list(ds.tokens), skip_special_tokens=False).split("<|eos|>")
    assert pieces[:-1] == ["<|bos|>" + d for d in DOCS] and pieces[-1] == ""
    # Windows tile the stream: inputs are consecutive, targets are inputs shifted by one, except that
    # BOS (the start of the next document) is never a target.
    x0, y0 = ds[0]
    x1, _ = ds[1]
    assert x0.dtype == torch.long and x0.shape == (16,)
    nxt = torch.cat([x0[1:], x1[:1]])
    bos = nxt == tokenizer.bos_id
    assert bos.any() and torch.equal(y0[~bos], nxt[~bos]) and (y0[bos] == IGNORE_INDEX).all()
    assert len(ds) == (ds.n_tokens - 1) // 16


def test_pack_cache_rebuilds_when_source_changes(tmp_path, tokenizer):
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(DOCS[:5]) + "\n", encoding="utf-8")
    out = tmp_path / "packed"
    build_packed([src], out, tokenizer, progress=False)
    mtime = (out / "meta.json").stat().st_mtime_ns
    build_packed([src], out, tokenizer, progress=False)
    assert (out / "meta.json").stat().st_mtime_ns == mtime  # up to date: reused
    src.write_text("\n".join(DOCS[:6]) + "\n", encoding="utf-8")
    os.utime(src, ns=(mtime + 10**9, mtime + 10**9))
    build_packed([src], out, tokenizer, progress=False)
    assert json.loads((out / "meta.json").read_text())["n_docs"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_masks_respected_across_cuts(tmp_path):
    # Doc A masks its tokens 3..5; the window length 4 cuts through that span.
    ids_a, mask_a = [10, 11, 12, 13, 14, 15, 16], [True, True, True, False, False, False, True]
    pack_documents([(ids_a, mask_a), [20, 21, 22]], tmp_path / "p", eos_id=2, vocab_size=100)
    ds = PackedDataset(tmp_path / "p", seq_len=4)
    xs = torch.cat([ds[i][0] for i in range(len(ds))])
    ys = torch.cat([ds[i][1] for i in range(len(ds))])
    stream = [10, 11, 12, 13, 14, 15, 16, 2, 20, 21, 22, 2]
    assert xs.tolist() == stream[: len(xs)]
    expected = [t if t not in (13, 14, 15) else IGNORE_INDEX for t in stream[1 : len(xs) + 1]]
    assert ys.tolist() == expected
    assert ds[0][1].tolist() == [11, 12, IGNORE_INDEX, IGNORE_INDEX]  # the masked span crosses the cut
    assert ds[1][1].tolist() == [IGNORE_INDEX, 16, 2, 20]


def test_pack_rejects_out_of_vocab_and_bad_mask(tmp_path):
    with pytest.raises(InputError, match="outside"):
        pack_documents([[1, 500]], tmp_path / "p", eos_id=2, vocab_size=100)
    with pytest.raises(InputError, match="mask"):
        pack_documents([([1, 2], [True])], tmp_path / "p", eos_id=2, vocab_size=100)
    assert not (tmp_path / "p").exists()


def test_large_vocab_uses_uint32(tmp_path):
    pack_documents([[70000, 1]], tmp_path / "p", eos_id=2, vocab_size=80000)
    assert PackedDataset(tmp_path / "p", seq_len=2).tokens.dtype == np.uint32


def test_val_split_is_deterministic_and_roughly_sized():
    flags = [in_val_split(d, 0.25) for d in DOCS * 5]
    assert flags == [in_val_split(d, 0.25) for d in DOCS * 5]
    assert 0 < sum(flags[:40]) < 40


def test_lmlm_annotation_masks_looked_up_values(tmp_path):
    from memlm.data.annotate import annotate_ids, call_string

    text = "A:" + call_string("Ada B. Ash", "birth_city", "Oslo") + " Oslo"
    src = tmp_path / "lmlm.jsonl"
    src.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    tok = Tokenizer.train([text] * 5, vocab_size=300)
    out = build_packed([src], tmp_path / "p", tok, annotate=annotate_ids, tag="lmlm", progress=False)
    ds = PackedDataset(out, seq_len=len(ds_tokens := tok.encode(text)))
    ids, mask = annotate_ids(tok, text)
    assert list(ds.tokens[1:-1]) == ids == ds_tokens
    assert (ds.tokens[0], ds.tokens[-1]) == (tok.bos_id, tok.eos_id)
    x, y = ds[0]
    # Position t predicts token t+1: it is ignored exactly when token t+1 is a looked-up value or <|db_end|>.
    assert [int(v) == IGNORE_INDEX for v in y] == [not m for m in mask]
    assert not all(mask) and tok.decode([i for i, m in zip(ids, mask) if not m]).strip() == "Oslo"
