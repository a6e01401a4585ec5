"""PlugLM: knowledge attention over the top-N bank entries inside the model, causal, scoped, refreshable."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

from memlm.bank.store import MemoryBank
from memlm.errors import ConfigError
from memlm.generate import Generator
from memlm.model import GPT, ModelConfig
from memlm.model.memory import MemoryContext
from memlm.model.memory.binding import load_reader, memory_record
from memlm.model.memory.pluglm import PlugInputs
from memlm.model.memory.pluglm_reader import KeyTable

N = 3


def docs(bios):
    return [json.loads(x)["text"] for x in (bios / "corpus/train.jsonl").read_text().splitlines()]


def plug_model(**options) -> GPT:
    torch.manual_seed(0)
    opts = {"key_dim": 16, "top_n": N, "entry_tokens": 24, **options}
    cfg = ModelConfig(
        vocab_size=400, n_layer=3, n_head=2, n_embd=32, block_size=224, memory="pluglm", memory_layers=[1],
        memory_options=opts,
    )  # fmt: skip
    return GPT(cfg)


@pytest.mark.parametrize(("value", "key"), [("vector", "about"), ("tokens", "about"), ("tokens", "parts")])
def test_shapes_backward_and_gold_labels(bios, bank_dir, tokenizer, value, key):
    model = plug_model(value=value, key=key).train()
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        batch = reader.train_batch(docs(bios)[:6])  # no rng: no swaps, objects as in the bank
        B, T = batch.input_ids.shape
        gold = batch.memory.inputs.gold
        assert gold.shape == (B, T) and (gold >= 0).sum() > 10
        # each run of labelled positions predicts exactly its gold entry's object, and nothing else is labelled
        spans = 0
        for b in range(B):
            runs: list[tuple[int, list[int]]] = []
            for t in range(T):
                g = int(gold[b, t])
                if g >= 0 and runs and runs[-1][0] == g and runs[-1][1][-1] == t - 1:
                    runs[-1][1].append(t)
                elif g >= 0:
                    runs.append((g, [t]))
            for g, ts in runs:
                entry = bank.get(int(reader.table.ids[g]))
                assert tokenizer.decode(batch.targets[b, ts].tolist()).strip() == entry.object
                spans += 1
        assert spans >= 6
        batch = reader.train_batch(docs(bios)[:6], rng=random.Random(0))
        B, T = batch.input_ids.shape
        out = model(batch.input_ids, targets=batch.targets, memory=batch.memory)
    assert out.logits.shape == (B, T, 400)
    assert out.retrieval.retrieved_ids.shape == (B, T, N)
    assert "pluglm_retrieval" in out.retrieval.aux_losses
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    layer = "blocks.1.memory."
    for name in (f"{layer}query.weight", f"{layer}wq.weight", f"{layer}wk.weight", f"{layer}wv.weight",
                 f"{layer}beta", "memory.key_proj.1.weight", "wte.weight"):  # fmt: skip
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    pooled = "memory.value_proj.1.weight" if value == "vector" else "memory.prev.weight"
    assert grads[pooled].abs().sum() > 0
    if key == "parts":  # the relation's half of query and key learns too
        for name in (
            f"{layer}relation_query.weight",
            "memory.relation_proj.1.weight",
            "memory.relation_pool.score.weight",
        ):
            assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_parts_keys_have_one_half_per_subject_and_one_per_relation(bios, bank_dir, tokenizer, tmp_path):
    """key: parts — a person's entries share the subject half exactly, a relation's entries the relation half;
    a text entry (no triple) pools its text into both; every key is a unit vector."""
    from test_explicitlm import assert_halves

    model = plug_model(key="parts").eval()
    shutil.copytree(bank_dir, tmp_path / "bank")  # entries are added: a private copy
    with MemoryBank.open(tmp_path / "bank") as bank:
        texts = [bank.add("An entry without a triple."), bank.add("Another note, about the weather.")]
        reader = load_reader(None, model, tokenizer, bank=bank)
        reader.prompts(["Q: x"])
        table = reader.table
        row = {int(i): r for r, i in enumerate(table.ids.tolist())}
        assert_halves(bank, table.keys, row, texts, half=8)  # key_dim 16


def test_inference_reads_read_top_n_while_training_reads_top_n(bios, bank_dir, tokenizer):
    model = plug_model(read_top_n=1).train()
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        batch = reader.train_batch(docs(bios)[:4])
        with torch.no_grad():
            trained = model(batch.input_ids, memory=batch.memory).retrieval.retrieved_ids
            read = model.eval()(batch.input_ids, memory=batch.memory).retrieval.retrieved_ids
    B, T = batch.input_ids.shape
    assert trained.shape == (B, T, N) and read.shape == (B, T, 1)
    assert torch.equal(read[..., 0], trained[..., 0])  # the best of the same search, not another entry
    with pytest.raises(ConfigError, match="read_top_n"):
        plug_model(read_top_n=0)


def test_teacher_forcing_puts_a_missed_gold_entry_among_the_read_ones(bios, bank_dir, tokenizer):
    """Training only: every labelled position reads its gold entry, in the last slot when the search missed it."""
    with MemoryBank.open(bank_dir) as bank:
        reads = {}
        for forcing in (0.0, 1.0):
            model = plug_model(teacher_forcing=forcing, value="tokens").train()
            reader = load_reader(None, model, tokenizer, bank=bank)
            batch = reader.train_batch(docs(bios)[:6])
            reads[forcing] = model(batch.input_ids, memory=batch.memory).retrieval.retrieved_ids
            model.eval()
            with torch.no_grad():
                reads[forcing, "eval"] = model(batch.input_ids, memory=batch.memory).retrieval.retrieved_ids
        gold = batch.memory.inputs.gold
        at = gold >= 0
        want = reader.table.ids[gold[at]][:, None]
        assert (reads[1.0][at] == want).any(-1).all()
        assert not (reads[0.0][at] == want).any(-1).all()  # the untrained search alone misses some
        assert torch.equal(reads[1.0][~at], reads[0.0][~at])  # unlabelled positions read what they found
        assert torch.equal(reads[1.0, "eval"], reads[0.0, "eval"])  # inference: no forcing
    with pytest.raises(ConfigError, match="teacher_forcing"):
        plug_model(teacher_forcing=-0.1)


def test_all_keys_as_retrieval_negatives(bios, bank_dir, tokenizer):
    """``retrieval_negatives: all``: every other key of the table joins the retrieved ones as a negative."""
    losses = {}
    with MemoryBank.open(bank_dir) as bank:
        for negatives in ("retrieved", "all"):
            model = plug_model(retrieval_negatives=negatives).train()
            reader = load_reader(None, model, tokenizer, bank=bank)
            batch = reader.train_batch(docs(bios)[:6])
            out = model(batch.input_ids, targets=batch.targets, memory=batch.memory)
            losses[negatives] = out.retrieval.aux_losses["pluglm_retrieval"]
    assert losses["all"].item() > losses["retrieved"].item() + 1e-3
    losses["all"].backward()
    assert model.blocks[1].memory.query.weight.grad.abs().sum() > 0


def test_swaps_change_entry_and_text_alike(bios, bank_dir, tokenizer):
    model = plug_model(swap_prob=1.0)
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        doc = next(d for d in docs(bios) if d.startswith("Q:"))
        batch = reader.train_batch([doc], rng=random.Random(0))
        inputs = batch.memory.inputs
        rows = [int(r) for r in inputs.override_rows[0] if r >= 0]
        j = next(j for j, r in enumerate(rows) if bank.get(int(reader.table.ids[r])).object in doc)
        entry = bank.get(int(reader.table.ids[rows[j]]))
        value = tokenizer.decode(inputs.override_tokens[0, j].tolist())
        text = tokenizer.decode(batch.input_ids[0].tolist())
    assert entry.object not in value and entry.object not in text
    head, tail = entry.text.split(entry.object)
    new = value.removeprefix(head).removesuffix(tail)  # the swapped object, read from the entry's value
    assert new and text.endswith("A: " + new)


def test_cue_noise_replaces_cue_words_but_never_the_name_or_the_answer(bios, bank_dir, tokenizer):
    from memlm.data.pack import IGNORE_INDEX

    texts = [d for d in docs(bios) if d.startswith("Q:")][:3] + [
        d for d in docs(bios) if not d.startswith("Q:")
    ][:3]
    with MemoryBank.open(bank_dir) as bank:
        plain = load_reader(None, plug_model(swap_prob=0.0), tokenizer, bank=bank).train_batch(
            texts, rng=random.Random(0)
        )
        reader = load_reader(None, plug_model(cue_noise=1.0, swap_prob=0.0), tokenizer, bank=bank)
        noisy = reader.train_batch(texts, rng=random.Random(0))
        assert torch.equal(reader.train_batch(texts).input_ids, plain.input_ids)  # no rng (evaluation): none
    changed = noisy.input_ids != plain.input_ids
    assert torch.equal(noisy.memory.inputs.gold, plain.memory.inputs.gold)  # objects keep their tokens
    for b, text in enumerate(texts):
        subject = reader._subject_entries(text)[0][1].subject
        first_object = int((plain.memory.inputs.gold[b] >= 0).float().argmax()) + 1  # its first token's index
        assert changed[b, 1:first_object].any() and not changed[b, first_object:].any()
        assert subject in tokenizer.decode(noisy.input_ids[b, :first_object].tolist())  # the name is kept
        # a random token is never a target; the rest are
        gone = torch.nonzero(changed[b]).flatten()
        assert (noisy.targets[b, gone - 1] == IGNORE_INDEX).all()
        kept = torch.nonzero(~changed[b][1:]).flatten()
        torch.testing.assert_close(noisy.targets[b, kept], plain.targets[b, kept])
        if text.startswith("Q:"):  # a question: every cue word before the answer line goes, not "A:"
            question = text.split("\n")[0].replace(subject, "")
            assert not any(w in tokenizer.decode(noisy.input_ids[b].tolist()) for w in question.split()[1:-1])
            assert "A:" in tokenizer.decode(noisy.input_ids[b].tolist())


@pytest.mark.parametrize("value", ["vector", "tokens"])
def test_causal_later_tokens_never_change_earlier_logits(bios, bank_dir, tokenizer, value):
    model = plug_model(value=value).eval()
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        batch = reader.train_batch(docs(bios)[:2], train=False)
        x = batch.input_ids[:1, :40].clone()
        y = x.clone()
        y[0, 25:] = torch.randint(5, 400, (15,))
        with torch.no_grad():
            a = model(x, memory=MemoryContext(inputs=PlugInputs(reader.table)))
            ids_a = a.retrieval.retrieved_ids.clone()
            b = model(y, memory=MemoryContext(inputs=PlugInputs(reader.table)))
    torch.testing.assert_close(a.logits[:, :25], b.logits[:, :25])
    assert torch.equal(ids_a[:, :25], b.retrieval.retrieved_ids[:, :25])
    assert not torch.equal(ids_a[:, 25:], b.retrieval.retrieved_ids[:, 25:])  # later queries did move


def test_inference_cache_follows_weight_updates(bios, bank_dir, tokenizer):
    model = plug_model(value="tokens").eval()
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        batch = reader.prompts(["Q: Where was Laura F. Glenholm born?\nA:"])
        x = torch.tensor(batch.token_ids)
        with torch.no_grad():
            cached = model(x, memory=batch.memory).logits
            model.blocks[1].memory.wv.weight.mul_(3.0)  # an in-place update, as an optimizer makes
            after = model(x, memory=batch.memory).logits
        uncached = model(x, memory=batch.memory).logits.detach()  # with gradient: never cached
    assert not torch.allclose(cached, after)
    torch.testing.assert_close(after, uncached)


def test_inference_gathers_the_read_tokens_with_the_vocabulary_wide_numbers(bios, bank_dir, tokenizer):
    model = plug_model(value="tokens", read_top_n=1).eval()
    layer = model.blocks[1].memory
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        batch = reader.prompts(["Q: Where was Laura F. Glenholm born?\nA:"])
        x = torch.tensor(batch.token_ids)
        L, cfg = reader.table.value_tokens.shape[1], model.config
        assert L * cfg.n_embd <= layer.n_head * cfg.vocab_size  # what the gathered path asks
        with torch.no_grad():  # no gradient, one entry read: the gathered path
            gathered = model(x, memory=batch.memory).logits
            bare = model(x).logits
        vocab_wide = model(x, memory=batch.memory).logits.detach()  # with gradient: the training path
    assert not torch.allclose(gathered, bare, atol=1e-3)  # the memory is read: the comparison has content
    torch.testing.assert_close(gathered, vocab_wide, rtol=1e-5, atol=1e-5)


def test_empty_memory_leaves_the_backbone_unchanged(tokenizer):
    model = plug_model(replace_ffn=False).eval()
    x = torch.randint(5, 400, (2, 12))
    table = KeyTable(ids=torch.zeros(0, dtype=torch.long), key_tokens=torch.zeros(0, 1, dtype=torch.long),
                     key_len=torch.zeros(0, dtype=torch.long), value_tokens=torch.zeros(0, 1, dtype=torch.long),
                     value_len=torch.zeros(0, dtype=torch.long), pad_id=0, key_dim=16)  # fmt: skip
    with torch.no_grad():
        empty = model(x, memory=MemoryContext(inputs=PlugInputs(table))).logits
        none = model(x).logits
        branch, model.blocks[1].memory = model.blocks[1].memory, None  # the backbone without the branch
        plain = model(x).logits
        model.blocks[1].memory = branch
    torch.testing.assert_close(empty, plain)
    torch.testing.assert_close(none, plain)


def test_exact_and_faiss_give_the_same_top_n():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(5000, 32, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=-1)
    tables = {}
    for kind in ("exact", "faiss"):
        t = KeyTable(ids=torch.arange(5000), key_tokens=torch.zeros(5000, 1, dtype=torch.long),
                     key_len=torch.ones(5000, dtype=torch.long), value_tokens=torch.zeros(5000, 1, dtype=torch.long),
                     value_len=torch.ones(5000, dtype=torch.long), pad_id=0, key_dim=32, index=kind)  # fmt: skip
        t.set_keys(keys)
        tables[kind] = t
    assert tables["faiss"].key_index.uses_faiss and not tables["exact"].key_index.uses_faiss
    exact, faiss = tables["exact"].search(queries, 8), tables["faiss"].search(queries, 8)
    assert torch.equal(exact, faiss)
    brute = (queries @ keys.T).argsort(dim=-1, descending=True)[:, :8]
    assert torch.equal(exact, brute)


def test_an_ivf_search_that_finds_fewer_than_n_rows_reads_its_best_one_in_their_place():
    """IVF probes some lists only and may return -1 past what it found; the layer indexes with every row, and a
    -1 would read the table's last entry."""
    from memlm.model.memory.pluglm_reader import _filled

    rows = torch.tensor([[3, 7, -1, -1], [-1, -1, -1, -1], [1, 2, 4, 5]])
    assert _filled(rows).tolist() == [[3, 7, 3, 3], [0, 0, 0, 0], [1, 2, 4, 5]]


def test_namespaces_scope_retrieval_and_plug_in_out_without_training(bios, tokenizer, tmp_path):
    facts = [json.loads(x) for x in (bios / "facts.jsonl").read_text().splitlines()]
    half = len(facts) // 2
    with MemoryBank.create(tmp_path / "bank") as bank:
        bank.add_many([{**f, "namespace": "a"} for f in facts[:half]])
        model = plug_model().eval()
        scoped = load_reader(None, model, tokenizer, bank=bank)
        assert scoped.refresh() > 0
        a_ids = {e.id for e in bank.iter_entries(["a"])}
        # plug in: a new namespace, no training; the next prompt reads it
        bank.add_many([{**f, "namespace": "b"} for f in facts[half:]])
        assert scoped.refresh() > 0
        b_ids = {e.id for e in bank.iter_entries(["b"])}
        assert set(scoped.table.ids.tolist()) == a_ids | b_ids
        only_a = plug_model(namespaces=["a"]).eval()
        only_a.load_state_dict(model.state_dict())
        reader_a = load_reader(None, only_a, tokenizer, bank=bank)
        prompts = [f"Q: Where was {f['subject']} born?\nA:" for f in facts[half::7]]
        gen = Generator(only_a, tokenizer, reader=reader_a).generate(prompts, max_new_tokens=3)
        seen = {i for g in gen for i in g.retrieved}
        assert seen and seen <= a_ids
        # any query at all: a scoped table holds no other namespace's entry to return
        rows = reader_a.table.search(torch.nn.functional.normalize(torch.randn(500, 16), dim=-1), N)
        assert set(reader_a.table.ids[rows].flatten().tolist()) <= a_ids
        full = Generator(model, tokenizer, reader=scoped).generate(prompts, max_new_tokens=3)
        assert {i for g in full for i in g.retrieved} & b_ids  # unscoped, the plugged-in entries are read
        # unplug: delete the namespace; nothing of it stays in the table or the token cache
        bank.delete(sorted(b_ids))
        scoped.refresh()
        assert set(scoped.table.ids.tolist()) == a_ids
        hashes = {h for _, h in scoped._tokens}
        assert hashes == {e.content_hash for e in bank.iter_entries()}


def test_edits_reach_keys_and_refresh_is_versioned(bios, bank_dir, tokenizer, tmp_path):
    import shutil

    shutil.copytree(bank_dir, tmp_path / "bank")
    model = plug_model(refresh_every=2).train()
    with MemoryBank.open(tmp_path / "bank") as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        versions, keys = [], []
        for step in range(4):
            batch = reader.train_batch(docs(bios)[step * 4 : step * 4 + 4], rng=random.Random(step))
            versions.append(reader.table.version)
            keys.append(reader.table.keys.clone())
            model(batch.input_ids, targets=batch.targets, memory=batch.memory).loss.backward()
            opt.step()
            opt.zero_grad()
        # refreshed at steps 0 and 2; stale (unchanged) in between although the encoder moved
        assert versions[1] == versions[0] and versions[2] == versions[1] + 1 and versions[3] == versions[2]
        assert torch.equal(keys[0], keys[1]) and not torch.equal(keys[1], keys[2])
        assert len(reader.refresh_seconds) >= 2
        # an edit of what an entry is about changes its key at the next prompt
        entry = next(iter(bank.iter_entries()))
        row = int((reader.table.ids == entry.id).nonzero())
        reader.prompts(["Q: x"])
        before = reader.table.keys[row].clone()
        bank.update(entry.id, subject="Someone Else Entirely")
        reader.prompts(["Q: x"])
        row = int((reader.table.ids == entry.id).nonzero())
        assert not torch.allclose(before, reader.table.keys[row])


def test_keys_spell_the_subject_as_a_question_does(bios, bank_dir, tokenizer):
    from test_explicitlm import assert_keys_spell_subjects

    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, plug_model().eval(), tokenizer, bank=bank)
        reader.prompts(["Q: x"])
        table = reader.table

        def key_tokens(entry):
            row = int((table.ids == entry.id).nonzero())
            return table.key_tokens[row, : int(table.key_len[row])].tolist()

        assert_keys_spell_subjects(bios, tokenizer, bank, key_tokens)


def test_save_load_round_trip_with_the_bank(bios, bank_dir, tokenizer, tmp_path):
    model = plug_model(value="tokens").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # not the init: the round trip must carry every weight
    with MemoryBank.open(bank_dir) as bank:
        model.save_pretrained(tmp_path / "m", tokenizer=tokenizer, memory=memory_record("pluglm", bank))
    prompts = [json.loads(x)["prompt"] for x in (bios / "qa/unseen.jsonl").read_text().splitlines()[:4]]
    with MemoryBank.open(bank_dir) as bank:
        before = Generator(model, tokenizer, reader=load_reader(None, model, tokenizer, bank=bank))
        a = before.generate(prompts, max_new_tokens=5)
    with Generator.from_pretrained(tmp_path / "m") as after:
        assert after.model.memory is not None
        b = after.generate(prompts, max_new_tokens=5)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.retrieved for g in a] == [g.retrieved for g in b] and a[0].retrieved


def test_memory_options_override_the_recorded_ones_when_reading(bios, bank_dir, tokenizer, tmp_path):
    from memlm.cli import main
    from memlm.errors import CheckpointError

    model = plug_model()
    with MemoryBank.open(bank_dir) as bank:
        model.save_pretrained(tmp_path / "m", tokenizer=tokenizer, memory=memory_record("pluglm", bank))

    def top_n(gen):
        return {m.top_n for m in gen.model.modules() if hasattr(m, "top_n")}

    with Generator.from_pretrained(tmp_path / "m") as gen:
        assert top_n(gen) == {N}
    with Generator.from_pretrained(tmp_path / "m", memory_options={"top_n": 1}) as gen:
        assert top_n(gen) == {1} and gen.model.config.memory_options["key_dim"] == 16  # the rest as recorded
    with pytest.raises(CheckpointError, match="no_such_option"):
        Generator.from_pretrained(tmp_path / "m", memory_options={"no_such_option": 1})
    out = tmp_path / "eval"
    args = ["eval", "qa", "--model", str(tmp_path / "m"), "--data", str(bios), "--split", "unseen", "--limit", "2",
            "--max-new-tokens", "2", "--out", str(out)]  # fmt: skip
    assert main([*args, "--memory-option", "top_n=1"]) == 0
    assert json.loads((out / "qa_unseen.json").read_text())["memory_options"] == {"top_n": 1}
    assert main([*args, "--memory-option", "top_n=0"]) == 2  # checked like the recorded options
    with pytest.raises(SystemExit):
        main([*args, "--memory-option", "top_n"])


def test_bind_shares_the_token_embedding_without_a_second_name():
    model = plug_model()
    assert model.memory.embedding(torch.tensor([[7]]))[0, 0].equal(
        model.wte.weight[7]
    )  # GPT calls design.bind
    assert not any(k.startswith("memory.") and "wte" in k for k in model.state_dict())
    own = plug_model(encoder="own")
    assert "memory.embed.weight" in own.state_dict()
    assert not own.memory.embedding(torch.tensor([[7]]))[0, 0].equal(own.wte.weight[7])


def test_options_are_checked():
    from memlm.errors import ConfigError

    with pytest.raises(ConfigError, match="value"):
        plug_model(value="pooled")
    with pytest.raises(ConfigError, match="memory_layers"):
        GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, memory="pluglm", memory_layers=[5]))


@pytest.mark.slow
def test_cpu_training_step_with_a_tiny_config(bios, bank_dir, tmp_path, memory_train_args):
    from memlm.cli import main

    options = '{"key_dim": 16, "top_n": 2, "value": "tokens", "refresh_every": 2}'
    args = memory_train_args(
        "pluglm", options, bios / "corpus/train.jsonl", bank_dir, tmp_path / "run",
        batch_size=4, max_steps=3, warmup=1, log_every=1, extra=["--train.memory_lr", "1e-2"],
    )  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3 and all(np.isfinite(r["loss"]) for r in train)
    assert train[0]["lr_memory"] != train[0]["lr"]
    assert (tmp_path / "run/final/model.safetensors").is_file()


def test_query_encoder_joins_the_query_only_after_the_question_is_read(bios, bank_dir, tokenizer, tmp_path):
    from memlm.encode import load_encoder
    from memlm.model.memory.rag import query_text

    model = plug_model(query_encoder="hashing").train()
    layer = model.blocks[1].memory
    texts = docs(bios)[:6]
    encoder = load_encoder("hashing")
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        batch = reader.train_batch(texts, rng=random.Random(0))
        inputs = batch.memory.inputs
        assert inputs.text.shape == (6, 384) and inputs.text_mask.shape == batch.input_ids.shape
        for b in range(
            len(texts)
        ):  # marked from the first sentence's last token on; embedded after the swaps
            row = [t for t in batch.input_ids[b].tolist() if t != tokenizer.pad_id][1:]
            first = int(inputs.text_mask[b].float().argmax())
            assert not inputs.text_mask[b, :first].any() and first > 3
            sentence = query_text(tokenizer.decode(row))
            assert tokenizer.decode(row[:first]) == sentence
            torch.testing.assert_close(inputs.text[b], torch.from_numpy(encoder.encode([sentence])[0]))
        model(batch.input_ids, targets=batch.targets, memory=batch.memory).loss.backward()
        assert layer.text_query.weight.grad.abs().sum() > 0  # zero-initialised, and it learns
        model.eval()
        with torch.no_grad():
            layer.text_query.weight.normal_(0, 1.0)
            a = model(batch.input_ids, memory=batch.memory)
            inputs.text = torch.randn_like(inputs.text)  # another question: only positions after it move
            b = model(batch.input_ids, memory=batch.memory)
        moved = (a.logits - b.logits).abs().amax(-1) > 1e-5  # (B, T)
        assert not (moved & ~inputs.text_mask).any() and (moved & inputs.text_mask).any()

        # Prompts: generation left-pads, so each row's marks end with its prompt; decoding reads them.
        prompts = ["Q: Where was Laura F. Glenholm born?\nA:", "Q: Who is it?\nA:"]
        pb = reader.prompts(prompts)
        mask = pb.memory.inputs.text_mask
        assert mask.shape == (2, max(len(r) for r in pb.token_ids)) and mask[:, -1].all()
        for row, m in zip(pb.token_ids, mask):
            first = int(m.float().argmax()) - (len(m) - len(row))  # in the row's own positions
            assert tokenizer.decode(row[1 : first + 1]) == query_text(tokenizer.decode(row[1:]))
        gen = Generator(model, tokenizer, reader=reader).generate(prompts, max_new_tokens=3)
        assert len(gen) == 2 and gen[0].retrieved
        model.save_pretrained(tmp_path / "m", tokenizer=tokenizer, memory=memory_record("pluglm", bank))
    with Generator.from_pretrained(tmp_path / "m") as again:
        assert [g.text for g in again.generate(prompts, max_new_tokens=3)] == [g.text for g in gen]
    with pytest.raises(ConfigError, match="query_encoder"):
        plug_model(query_encoder="hashing", key="parts")
    with pytest.raises(ConfigError, match="384-d"), MemoryBank.open(bank_dir) as bank:
        load_reader(
            None, plug_model(query_encoder="hashing", query_encoder_dim=8), tokenizer, bank=bank
        ).prompts(prompts)


def test_query_route_search_retrieves_by_the_text_once_it_is_read(bios, bank_dir, tokenizer, tmp_path):
    """``query_route: search``: positions that have read the text retrieve its encoder's top N over that encoder's
    vectors of the entries' keys, scored by that similarity; earlier positions keep the learnt query, which
    alone is taught by the retrieval loss; edits reach the text keys."""
    from memlm.encode import load_encoder
    from memlm.model.memory.question import key_text

    shutil.copytree(bank_dir, tmp_path / "bank")
    encoder = load_encoder("hashing")
    model = plug_model(query_encoder="hashing", query_route="search").train()
    assert model.blocks[1].memory.text_query is None  # no learnt term: the text retrieves as it is
    texts = docs(bios)[:6]
    with MemoryBank.open(tmp_path / "bank") as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        batch = reader.train_batch(texts, rng=random.Random(0))
        table, inputs = reader.table, batch.memory.inputs
        want_keys = encoder.encode([key_text(e, "about") for e in bank.get_many(table.ids.tolist())])
        torch.testing.assert_close(table.text_keys, torch.from_numpy(want_keys))
        sims = inputs.text @ table.text_keys.T  # (B, M)
        top = table.ids[sims.topk(N, dim=-1).indices]  # (B, N): the text's own search, exact
        layer = model.blocks[1].memory
        seen = []
        hook = layer.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        model.eval()
        with torch.no_grad():
            out = model(batch.input_ids, memory=batch.memory).retrieval
            hook.remove()
            learnt = table.search(layer.retrieval_query(seen[0]).flatten(0, 1), N).view(*seen[0].shape[:2], N)
        read = inputs.text_mask
        assert read.any() and (~read).any()
        got = out.retrieved_ids  # (B, T, N)
        assert torch.equal(got[read], top[:, None, :].expand(*read.shape, N)[read])
        best = sims.topk(N, dim=-1).values[:, None, :].expand(*read.shape, N)
        torch.testing.assert_close(out.retrieved_scores[read], best[read])
        assert torch.equal(got[~read], table.ids[learnt[~read]])

        # The retrieval loss teaches the learnt query only: golds after the text add none of it.
        model.train()
        gold = inputs.gold.clone()
        for where, loss in ((read, False), (~read, True)):  # golds kept: after the text, before it
            inputs.gold, batch.memory.aux_losses = gold.masked_fill(~where, -1), {}
            assert (inputs.gold >= 0).any()
            model(batch.input_ids, memory=batch.memory)
            assert ("pluglm_retrieval" in batch.memory.aux_losses) == loss

        # A prompt reads the entry its question is about; deleted, that entry is gone from the text search too.
        model.eval()
        prompt = "Q: Where was Laura F. Glenholm born?\nA:"
        first = Generator(model, tokenizer, reader=reader).generate([prompt], max_new_tokens=2)[0]
        q = torch.from_numpy(encoder.encode(["Q: Where was Laura F. Glenholm born?"])[0])
        want = int(table.ids[(table.text_keys @ q).argmax()])
        assert want in first.retrieved
        bank.delete([want])
        again = Generator(model, tokenizer, reader=reader).generate([prompt], max_new_tokens=2)[0]
        assert want not in again.retrieved and want not in reader.table.ids.tolist()
    with pytest.raises(ConfigError, match="query_route"):
        plug_model(query_route="search")


def test_a_timed_decode_encodes_its_questions_as_rag_does(bios, bank_dir, tokenizer):
    """The question reader's embedding cache would let the timed pass reuse the warm-up's encodings: speed
    measurements start it empty, so a routed design pays for its questions like RAG and Memory³ do."""
    from memlm.eval.speed import decode_tokens_per_s

    model = plug_model(query_encoder="hashing", query_route="search").eval()
    prompts = ["Q: Where was Laura F. Glenholm born?\nA:", "Q: Who employs Laura F. Glenholm?\nA:"]
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        encoded = []
        encode = reader.question.encoder.encode
        reader.question.encoder.encode = lambda texts: encoded.extend(texts) or encode(texts)
        assert decode_tokens_per_s(model, reader, prompts, batch_size=2, new_tokens=2) > 0
    asked = [t for t in encoded if t.startswith("Q:")]  # (the entries' keys are encoded on first use)
    assert len(asked) == 4  # the warm-up's two questions, and the timed pass's two again
