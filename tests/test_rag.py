"""RAG and the memory path: layout, causality of training samples, provenance, bank swaps, bank errors."""

import json
import random
import shutil

import pytest
import torch

from memlm.bank.store import BankError, MemoryBank
from memlm.generate import Generator
from memlm.model import GPT, ModelConfig
from memlm.model.memory.binding import load_reader, memory_record, write_memory_record
from memlm.model.memory.rag import query_text
from memlm.tokenizer import MEM

K = 3
OPTIONS = {"k": K, "encoder": "hashing:64", "swap_prob": 0.0}


def rag_model(**options) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=400, n_layer=2, n_head=2, n_embd=32, block_size=224, memory="rag",
        memory_options={**OPTIONS, **options},
    )  # fmt: skip
    return GPT(cfg).eval()


def facts(bios):
    return [json.loads(x) for x in (bios / "facts.jsonl").read_text().splitlines()]


def qa(bios, split="unseen"):
    return [json.loads(x) for x in (bios / f"qa/{split}.jsonl").read_text().splitlines()]


def test_prompt_layout_and_provenance(bios, bank_dir, tokenizer):
    model = rag_model()
    with MemoryBank.open(bank_dir) as bank:
        reader = model_reader = load_reader(None, model, tokenizer, bank=bank)
        q = qa(bios)[0]
        batch = reader.prompts([q["prompt"]])
        used = batch.used[0]
        assert len(used) == K and all(i in bank for i in used)
        text = tokenizer.decode(batch.token_ids[0], skip_special_tokens=False)
        entries = [bank.get(i).text for i in used]
        # BOS, the entries best last (nearest the prompt), MEM, the prompt
        expected = "<|bos|>" + "".join(t + "\n" for t in reversed(entries)) + MEM + q["prompt"]
        assert text == expected
        out = Generator(model, tokenizer, reader=model_reader).generate([q["prompt"]], max_new_tokens=4)[0]
        assert out.retrieved == used
        assert out.trace[0]["kind"] == "retrieve" and out.trace[0]["entry_ids"] == used


@pytest.mark.parametrize(
    ("doc", "query"),
    [
        (
            "Q: Which company employs Flora V. Halley?\nA: Blue Media",
            "Q: Which company employs Flora V. Halley?",
        ),
        ("Ada L. Byron was born in London. She wrote code.", "Ada L. Byron was born in London."),
        ("Dr. Smith moved to the U.S. in 1990. Then he left.", "Dr. Smith moved to the U.S. in 1990."),
        ("First line\nsecond line", "First line"),
        ("No sentence end", "No sentence end"),
    ],
)
def test_query_is_the_first_sentence_and_initials_do_not_end_it(doc, query):
    assert query_text(doc) == query


def test_training_query_never_holds_a_target(bios, bank_dir, tokenizer):
    model = rag_model()
    doc = next(json.loads(x)["text"] for x in (bios / "corpus/train.jsonl").read_text().splitlines()
               if not json.loads(x)["text"].startswith("Q:"))  # fmt: skip
    query = query_text(doc)
    assert doc.startswith(query) and query.endswith(".") and len(query) < len(doc)
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        batch = reader.train_batch([doc])
        q_len = batch.query_len[0]
        targets = batch.targets[0]
        predicted = torch.nonzero(targets != -100).flatten() + 1  # index of each target token in the row
        assert predicted.min() >= q_len  # no token of the memory or the query is ever a target
        assert tokenizer.decode(batch.input_ids[0, :q_len].tolist()).endswith(query)
        # Changing the document after its query changes neither what was retrieved nor anything before it.
        other = query + " Someone else entirely did something else in Atlantis."
        b2 = reader.train_batch([other])
        assert b2.used == batch.used and b2.query_len == batch.query_len
        assert torch.equal(b2.input_ids[0, :q_len], batch.input_ids[0, :q_len])
        x1, x2 = batch.input_ids, b2.input_ids
        n = min(x1.shape[1], x2.shape[1])
        first_diff = int(torch.nonzero(x1[0, :n] != x2[0, :n])[0])
        l1, l2 = model(x1[:, :n]).logits, model(x2[:, :n]).logits
        assert torch.equal(l1[:, :first_diff], l2[:, :first_diff])  # later tokens never change earlier logits


def test_swap_replaces_objects_in_entries_and_text_alike(bios, bank_dir, tokenizer):
    model = rag_model(swap_prob=1.0, k=6)
    person = facts(bios)[:6]
    doc = " ".join(f["text"] for f in person)
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        a = reader.train_batch([doc], rng=random.Random(3))
        b = reader.train_batch([doc], rng=random.Random(3))
        assert torch.equal(a.input_ids, b.input_ids)  # a function of the rng: resume stays exact
        text = tokenizer.decode(a.input_ids[0].tolist(), skip_special_tokens=False)
        memory, sample = text.split(MEM)
        read = [bank.get(i) for i in a.used[0]]
        own = [e for e in read if e.subject == person[0]["subject"] and e.object in doc]
        assert len(own) >= 3
        for e in own:  # the old value is gone from both sides; the sentence around it is still there
            assert e.object not in sample and e.object not in memory
            assert e.text.replace(e.object, "")[:-1] in memory
        plain = reader.train_batch([doc], rng=random.Random(3), train=False)
        assert person[1]["object"] in tokenizer.decode(plain.input_ids[0].tolist())


def test_swapping_the_bank_changes_what_the_model_reads(bios, bank_dir, tokenizer, tmp_path):
    model = rag_model()
    q = qa(bios)[1]
    other = tmp_path / "other"
    shutil.copytree(bank_dir, other)
    with MemoryBank.open(other) as bank:
        eid = next(e.id for e in bank if (e.subject, e.relation) == (q["subject"], q["relation"]))
        bank.update(eid, object="Atlantis")
    gen_a = Generator(model, tokenizer, reader=load_reader(None, model, tokenizer, bank=bank_dir))
    gen_b = Generator(model, tokenizer, reader=load_reader(None, model, tokenizer, bank=other))
    prompt_a = tokenizer.decode(gen_a.reader.prompts([q["prompt"]]).token_ids[0])
    prompt_b = tokenizer.decode(gen_b.reader.prompts([q["prompt"]]).token_ids[0])
    assert q["answer"] in prompt_a and "Atlantis" not in prompt_a
    assert "Atlantis" in prompt_b and f"born in {q['answer']}." not in prompt_b


def test_bank_errors(bios, bank_dir, tokenizer, tmp_path):
    model = rag_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder, tokenizer=tokenizer)
    with pytest.raises(BankError, match="records none it was trained with"):
        Generator.from_pretrained(folder)
    with MemoryBank.open(bank_dir) as bank:
        record = memory_record("rag", bank)
    write_memory_record(folder, record)
    assert Generator.from_pretrained(folder).reader.bank.path.resolve() == bank_dir.resolve()
    write_memory_record(folder, {**record, "bank": {**record["bank"], "path": str(tmp_path / "gone")}})
    with pytest.raises(BankError, match="no longer exists"):
        Generator.from_pretrained(folder)
    (tmp_path / "not-a-bank").mkdir()
    with pytest.raises(BankError, match="not a memlm bank"):
        Generator.from_pretrained(folder, bank=tmp_path / "not-a-bank")
    MemoryBank.create(tmp_path / "empty").close()
    with pytest.raises(BankError, match="no entries"):
        Generator.from_pretrained(folder, bank=tmp_path / "empty")
    scoped = rag_model(namespaces=["geo"])
    with pytest.raises(BankError, match=r"no entries in namespaces \['geo'\]"):
        load_reader(None, scoped, tokenizer, bank=bank_dir)
    dense = GPT(ModelConfig(vocab_size=400, n_layer=1, n_head=2, n_embd=32, block_size=64))
    dense.save_pretrained(tmp_path / "dense", tokenizer=tokenizer)
    with pytest.raises(BankError, match="no memory that reads a bank"):
        Generator.from_pretrained(tmp_path / "dense", bank=bank_dir)


def test_about_key_searches_what_an_entry_is_about(tmp_path):
    from memlm.encode import HashingEncoder
    from memlm.index import Retriever

    with MemoryBank.create(tmp_path / "b") as bank:
        ids = bank.add_many([
            {"subject": "Ada Byron", "relation": "birth_city", "object": "London", "text": "Ada Byron was born in London."},
            {"subject": "Ada Byron", "relation": "employer", "object": "Born Labs", "text": "Ada Byron works for Born Labs."},
            {"text": "A note without a triple about Ada Byron."},
        ])  # fmt: skip
        enc = HashingEncoder(dim=256)
        by_text = Retriever.build(bank, enc, key="text")
        about = Retriever.build(bank, enc, key="about")
        assert about.cache.fingerprint != by_text.cache.fingerprint  # the key is part of what vectors mean
        # The object's words pull a text search to the wrong fact; "subject relation" does not contain them.
        q = ["Ada Byron employer: where was she born?"]
        assert about.search(q, 1)[1][0, 0] == ids[1] and by_text.search(q, 1)[1][0, 0] == ids[0]
        before = about.cache.get([ids[0]])
        bank.update(ids[0], object="Paris")  # a new value does not move the entry in an "about" index
        about.refresh()
        torch.testing.assert_close(torch.from_numpy(about.cache.get([ids[0]])), torch.from_numpy(before))
        torch.testing.assert_close(
            torch.from_numpy(about.cache.get([ids[2]])),
            torch.from_numpy(by_text.cache.get([ids[2]])),
        )  # no triple: the text is the key


def test_training_picks_the_entry_the_continuation_names_and_noises_only_the_query(bios, bank_dir, tokenizer):
    people = facts(bios)
    person = people[6:12]
    doc = f"Q: What about {person[0]['subject']}?\nA: {person[3]['object']}"  # names one fact's object
    with MemoryBank.open(bank_dir) as bank:
        plain = load_reader(None, rag_model(k=1), tokenizer, bank=bank)
        hits = plain.search([query_text(doc)], k=6)[0][0]
        gold = next(
            e.id for e in bank if (e.subject, e.relation) == (person[3]["subject"], person[3]["relation"])
        )
        assert gold in hits and hits[0] != gold  # plain top-1 misses it, top-6 has it
        picking = load_reader(None, rag_model(k=1, train_pick=6), tokenizer, bank=bank)
        assert plain.train_batch([doc], rng=random.Random(0)).used == [[hits[0]]]
        assert picking.train_batch([doc], rng=random.Random(0)).used == [[gold]]
        assert picking.train_batch([doc], train=False).used == [[hits[0]]]  # validation reads like inference
        noisy = load_reader(None, rag_model(k=1, query_noise=1.0), tokenizer, bank=bank)
        a, b = plain.train_batch([doc], rng=random.Random(0)), noisy.train_batch([doc], rng=random.Random(0))
        q_len, mem_len = a.query_len[0], a.input_ids[0].tolist().index(tokenizer.token_id(MEM)) + 1
        assert torch.equal(a.input_ids[0, :mem_len], b.input_ids[0, :mem_len])  # memory untouched
        assert (a.input_ids[0, mem_len:q_len] != b.input_ids[0, mem_len:q_len]).float().mean() > 0.8
        assert (b.input_ids[0, mem_len:q_len] >= 8).all()  # never a special token
        assert torch.equal(a.input_ids[0, q_len:], b.input_ids[0, q_len:]) and torch.equal(
            a.targets, b.targets
        )
