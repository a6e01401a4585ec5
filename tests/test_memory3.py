"""Memory³: sparse memories (exactly ``keep`` tokens per head, the most attended), chunked reading in one
training forward equal to chunk-by-chunk decoding, causality, storage formats, memories tied to the checkpoint
and to the entry's content, deletion reaching every cache, two training stages, save/load."""

import hashlib
import json
import math
import random

import numpy as np
import pytest
import torch

from memlm.bank.store import MemoryBank
from memlm.errors import ConfigError
from memlm.generate import DecodeState, Generator
from memlm.model import GPT, ModelConfig
from memlm.model.gpt import apply_rope
from memlm.model.memory import MemoryContext
from memlm.model.memory.binding import load_reader, memory_record
from memlm.model.memory.memory3 import Memories, encode_references
from memlm.model.memory.memory3_store import (
    PREFIX,
    Codec,
    Int8Codec,
    PQCodec,
    StaleMemoryError,
    full_kv_bytes,
)
from memlm.model.memory.rag import query_text

KEEP = 4
OPTIONS = {"k": 3, "keep": KEEP, "chunk": 8, "encoder": "hashing:64", "storage": "fp32", "max_overlap": 1.0}


@pytest.fixture()
def bank_dir(bios, tmp_path):
    path = tmp_path / "bank"
    with MemoryBank.create(path) as bank:
        bank.import_jsonl(bios / "facts.jsonl")
    return path


def m3_model(**options) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=400, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, block_size=224, memory="memory3",
        memory_layers=[0, 1], memory_options={**OPTIONS, **options},
    )  # fmt: skip
    return GPT(cfg).eval()


def docs(bios, n=4):
    texts = [json.loads(x)["text"] for x in (bios / "corpus/train.jsonl").read_text().splitlines()]
    return [t for t in texts if not t.startswith("Q:")][:n]


def qa(bios):
    return [json.loads(x) for x in (bios / "qa/unseen.jsonl").read_text().splitlines()]


# ---- writing memories ---------------------------------------------------------------------------


def naive_memory(model, ids, layer, keep):
    """One reference, the paper's recipe written out plainly: per key-value head, softmax attention of every
    query over every token (no causal mask), summed per token over its query heads; the top ``keep`` tokens
    after BOS; their RoPE'd keys."""
    cfg = model.config
    n = len(ids)
    x = model.wte(torch.tensor([ids]))
    cos, sin = model.rope(torch.arange(n)[None])
    for block in model.blocks[:layer]:
        x = block(x, cos, sin, None, None, None)
    qkv = model.blocks[layer].attn.wqkv(model.blocks[layer].attn_norm(x))[0]  # (n, (nh + 2H) D)
    D, nh, H = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    heads = qkv.view(n, nh + 2 * H, D).transpose(0, 1)
    q = apply_rope(heads[:nh][None], cos, sin)[0]
    k = apply_rope(heads[nh : nh + H][None], cos, sin)[0]
    kept, keys = [], []
    for h in range(H):
        received = torch.zeros(n)
        for qh in range(h * nh // H, (h + 1) * nh // H):
            received += torch.softmax(q[qh] @ k[h].T / math.sqrt(D), dim=-1).sum(0)
        top = sorted((1 + received[1:].topk(min(keep, n - 1)).indices).tolist())
        kept.append(top)
        keys.append(k[h, top])
    return kept, keys


def test_exactly_keep_most_attended_tokens_per_head_with_rope_keys(bank_dir, tokenizer):
    model = m3_model()
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        texts = [e.text for e in list(bank)[:5]] + ["Ada"]  # the last is shorter than keep
        refs = [reader.reference_ids(t) for t in texts]
        assert len(refs[-1]) - 1 < KEEP
        ids, lengths = reader._pad(refs)
        with torch.no_grad():
            enc = encode_references(model, ids, lengths, layers=[0, 1], keep=KEEP)
        assert enc.k.shape == enc.v.shape == (6, 2, 2, KEEP, 8)  # (R, layers, kv heads, keep, head dim)
        assert enc.n.tolist() == [KEEP] * 5 + [len(refs[-1]) - 1]
        for r, ref in enumerate(refs):
            for j, layer in enumerate([0, 1]):
                with torch.no_grad():
                    kept, keys = naive_memory(model, ref, layer, KEEP)
                n = int(enc.n[r])
                for h in range(2):
                    assert enc.positions[r, j, h, :n].tolist() == kept[h]  # the same tokens, in order
                    assert len(set(kept[h])) == n and 0 not in kept[h]  # exactly n distinct, never BOS
                    torch.testing.assert_close(enc.k[r, j, h, :n], keys[h], atol=1e-5, rtol=1e-4)
                assert enc.k[r, :, :, n:].abs().sum() == 0  # unfilled slots are empty
        # Parallel positions: a memory does not depend on the batch it was encoded in.
        with torch.no_grad():
            alone = encode_references(model, *reader._pad(refs[:1]), layers=[0, 1], keep=KEEP)
        torch.testing.assert_close(alone.k[0], enc.k[0], atol=1e-5, rtol=1e-4)


QA_DOC = "Q: Which company employs Flora V. Halley?\nA: Blue Media"


def test_training_batch_shapes_backward_and_memory_that_matters(bios, bank_dir, tokenizer):
    texts = [*docs(bios), QA_DOC]
    grads = {}
    with MemoryBank.open(bank_dir) as bank:
        for grad in (True, False):
            model = m3_model(encode_grad=grad).train()
            batch = load_reader(None, model, tokenizer, bank=bank).train_batch(texts)
            model(batch.input_ids, targets=batch.targets, memory=batch.memory).loss.backward()
            grads[grad] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        mem = batch.memory.inputs
        B, T = batch.input_ids.shape
        n_chunks = int(mem.chunk_of.max()) + 1
        assert n_chunks >= 3 and mem.slots.shape == (B, n_chunks * 3) and mem.chunk_of.shape == (B, T)
        # Chunk 1 starts where generation retrieves again: after `chunk` tokens past the query.
        q_len, C = batch.query_len[0], OPTIONS["chunk"]
        assert mem.chunk_of[0, : q_len + C - 1].eq(0).all() and mem.chunk_of[0, q_len + C - 1] == 1
        assert mem.chunk_of[0, q_len + 2 * C - 1] == 2 and mem.chunk_of[0, q_len + 2 * C - 2] == 1
        k, v, mask = mem.layer(1)
        assert k.shape == v.shape == (B, 2, n_chunks * 3 * KEEP, 8) and mask.shape == (
            B,
            T,
            n_chunks * 3 * KEEP,
        )
        assert all(torch.isfinite(g).all() for g in grads[True].values())
        # The writing is trained too: through the memories, the memory layers' projections get more gradient.
        w = "blocks.0.attn.wqkv.weight"
        assert not torch.allclose(grads[True][w], grads[False][w], atol=1e-6)

        # Memory changes the prediction; an empty memory leaves the base model as it is.
        model.eval()
        with torch.no_grad():
            base = model(batch.input_ids).logits
            read = model(batch.input_ids, memory=batch.memory).logits
            empty = Memories(slots=torch.full_like(mem.slots, -1), encoded=mem.encoded, chunk_of=mem.chunk_of,
                             slot_chunk=mem.slot_chunk)  # fmt: skip
            none = model(batch.input_ids, memory=MemoryContext(inputs=empty)).logits
        assert not torch.allclose(read, base, atol=1e-3)
        torch.testing.assert_close(none, base, atol=1e-5, rtol=0)


# ---- reading: causality and the chunked forward ------------------------------------------------------


def hashed_search(bank):
    """A stand-in retriever under which every distinct query text retrieves other entries, so that reading one
    token too many or too few for a retrieval cannot go unnoticed."""
    ids = [e.id for e in bank]

    def search(queries, k=3):
        picks = [random.Random(hashlib.sha1(q.encode()).digest()).sample(ids, k) for q in queries]
        return picks, [[1.0] * k for _ in queries]

    return search


def refs_read(memories, chunk, row=0, k=3):
    """The token ids of the references a chunk of a training row reads."""
    slots = memories.slots[row, chunk * k : (chunk + 1) * k].tolist()
    return [memories.refs[s, : memories.ref_len[s]].tolist() for s in slots if s >= 0]


def test_training_retrieval_and_logits_are_causal(bios, bank_dir, tokenizer):
    model = m3_model()
    doc = docs(bios)[0]
    query = query_text(doc)
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        reader.search = hashed_search(bank)
        a = reader.train_batch([doc])
        q_len, C = a.query_len[0], OPTIONS["chunk"]
        predicted = torch.nonzero(a.targets[0] != -100).flatten() + 1
        assert predicted.min() == q_len  # no token of the query is a target
        assert tokenizer.decode(a.input_ids[0, 1:q_len].tolist()) == query
        rest = a.input_ids[0, q_len:].tolist()
        with torch.no_grad():
            l1 = model(a.input_ids, memory=a.memory).logits[0]
        m1 = a.memory.inputs
        # Rewrite the document from each point of two chunks on: nothing before that point may change.
        for cut in range(C - 2, 2 * C + 2):
            b = reader.train_batch(
                [query + tokenizer.decode(rest[:cut]) + " Atlantis, where alchemy is studied."]
            )
            x1, x2 = a.input_ids[0], b.input_ids[0]
            first = int(torch.nonzero(x1[: len(x2)] != x2[: len(x1)])[0])
            m2 = b.memory.inputs
            for c in range(int(m1.chunk_of[0, first - 1]) + 1):  # every chunk that starts before the change
                assert refs_read(m1, c) == refs_read(m2, c), (cut, c)  # read the same references
            with torch.no_grad():
                l2 = model(b.input_ids, memory=b.memory).logits[0]
            torch.testing.assert_close(l1[:first], l2[:first], atol=1e-5, rtol=0)


def test_training_forward_equals_chunk_by_chunk_generation(bios, bank_dir, tokenizer):
    """Every chunk's memories in one masked forward == decoding token by token with a KV cache, the memories
    retrieved again every `chunk` tokens by the generator's step hook and read from the store."""
    model = m3_model()
    doc = docs(bios)[1]
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        reader.search = hashed_search(bank)
        batch = reader.train_batch([doc], train=False)
        with torch.no_grad():
            train_logits = model(batch.input_ids, memory=batch.memory).logits[0]
        q_len = batch.query_len[0]
        row = batch.input_ids[0].tolist()
        assert int(batch.memory.inputs.chunk_of.max()) >= 3

        prompt = reader.prompts([query_text(doc)])
        assert prompt.token_ids[0] == row[:q_len]
        hook = reader.step_hook(prompt)
        state = DecodeState(
            step=0, tokens=[[]], finished=[False], memory=prompt.memory, trace=[[]], retrieved=[[]]
        )
        cache = model.new_cache(1)
        logits, reads = [], []
        with torch.no_grad():
            logits.append(model(torch.tensor([row[:q_len]]), cache=cache, memory=state.memory).logits[0])
            for s, tok in enumerate(row[q_len:], start=1):
                state.tokens[0].append(tok)
                state.step = s
                hook(state)
                reads.append(state.memory.inputs.entry_ids[0])
                logits.append(model(torch.tensor([[tok]]), cache=cache, memory=state.memory).logits[0])
        steps = torch.cat(logits)
        torch.testing.assert_close(steps, train_logits, atol=1e-4, rtol=1e-4)
        k, _, mask = state.memory.inputs.layer(0)  # one row decodes from its filled slots, with no mask
        assert mask is None and 0 < k.shape[2] == int(state.memory.inputs._mask.sum())
        assert len({frozenset(r) for r in reads}) >= 4  # the memories really changed along the way
        assert state.trace[0] and all(t["kind"] == "retrieve" for t in state.trace[0])


# ---- storage ----------------------------------------------------------------------------------------


def test_formats_round_trip_within_their_bounds_and_sizes():
    shape = (2, 2, KEEP, 8)  # layers, kv heads, keep, head dim
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 1, 8)  # channels of very different ranges: why scales are per channel
    k = (torch.randn(400, *shape, generator=g) * scales).numpy()
    v = (torch.randn(400, *shape, generator=g) * scales.flip(0)).numpy()
    n = np.random.default_rng(0).integers(1, KEEP + 1, 400)
    values = 2 * 2 * 2 * KEEP * 8

    fp32 = Codec(shape, np.float32)
    k32, v32, n32 = fp32.unpack(fp32.pack(k, v, n))
    assert np.array_equal(k32, k) and np.array_equal(v32, v) and np.array_equal(n32, n)
    assert fp32.nbytes == 4 + 4 * values

    fp16 = Codec(shape, np.float16)
    k16, _, _ = fp16.unpack(fp16.pack(k, v, n))
    assert np.abs(k16 - k).max() <= np.abs(k).max() * 2**-11 and fp16.nbytes == 4 + 2 * values

    int8 = Int8Codec(shape)
    rows = int8.pack(k, v, n)
    assert rows.shape == (400, int8.nbytes) and int8.nbytes == 4 + values + 2 * 2 * 2 * 2 * 8
    k8, v8, n8 = int8.unpack(rows)
    assert np.array_equal(n8, n)
    for x, y in ((k, k8), (v, v8)):
        channel_max = np.abs(x).max(axis=3, keepdims=True)  # per (memory, layer, head, dim), over the slots
        bound = channel_max / 127 / 2 * (1 + 2**-10) + 1e-12  # half a step (scales are stored in fp16)
        assert (np.abs(y - x) <= bound).all()
    small = np.abs(k8 - k)[..., 0].max()  # the 0.01-range channel keeps its precision
    assert small < 1e-3

    pq = PQCodec.train(shape, k, v, n, m=4)
    kp, vp, _ = pq.unpack(pq.pack(k, v, n))
    assert pq.nbytes == 4 + 2 * 2 * 2 * KEEP * 4
    for x, y in ((k, kp), (v, vp)):
        filled = np.broadcast_to((np.arange(KEEP)[None, :] < n[:, None])[:, None, None, :, None], k.shape)
        err = ((y - x) ** 2)[filled].sum() / (x**2)[filled].sum()
        assert err < 0.2  # a lossy code, far better than nothing
    assert full_kv_bytes(3, 2, 8, 15) == 2 * 3 * 2 * 15 * 8 * 2


def test_memories_are_tied_to_the_checkpoint(bios, bank_dir, tokenizer):
    prompt = qa(bios)[0]["prompt"]
    model = m3_model()
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        first = reader.prompts([prompt]).memory.inputs
        assert reader.store.encoded == len(bank)  # every memory is written at the checkpoint's first read
        fresh = reader.encode([bank.get(i).text for i in first.entry_ids[0]])
        torch.testing.assert_close(first.encoded.k, fresh.k)  # fp32: stored == encoded
        # Another reader of the same weights reads the stored memories: nothing is encoded again.
        again = load_reader(None, m3_model(), tokenizer, bank=bank)
        torch.testing.assert_close(again.prompts([prompt]).memory.inputs.encoded.k, first.encoded.k)
        assert again.store.encoded == 0

        with torch.no_grad():  # the weights change in place (a training step, a fine-tune)
            model.blocks[0].attn.wqkv.weight.mul_(1.5)
        rebuilt = reader.prompts([prompt]).memory.inputs
        assert reader.store.encoded == 2 * len(bank) and not torch.allclose(
            rebuilt.encoded.k, first.encoded.k
        )
        torch.testing.assert_close(
            rebuilt.encoded.k, reader.encode([bank.get(i).text for i in rebuilt.entry_ids[0]]).k
        )

        strict = m3_model(on_stale="error")
        with torch.no_grad():
            strict.blocks[1].attn.wqkv.weight.mul_(0.5)  # weights the bank has no memories of
        with pytest.raises(StaleMemoryError, match="stale"):
            load_reader(None, strict, tokenizer, bank=bank).prompts([prompt])
        ok = m3_model(on_stale="error")  # the checkpoint that built them reads them
        reader_ok = load_reader(None, ok, tokenizer, bank=bank)
        reader_ok.prompts([prompt])
        with torch.no_grad():
            ok.norm.weight.add_(0.1)
        with pytest.raises(StaleMemoryError, match=r"weights are now"):
            reader_ok.prompts([prompt])


def test_edits_and_deletions_reach_every_cache(bios, bank_dir, tokenizer):
    q = qa(bios)[1]
    model = m3_model()
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, model, tokenizer, bank=bank)
        mem = reader.prompts([q["prompt"]]).memory.inputs
        eid = next(e.id for e in bank if (e.subject, e.relation) == (q["subject"], q["relation"]))
        assert eid in mem.entry_ids[0] and eid in reader.store._lru
        fp = reader.store.fingerprint
        (row,) = bank.connection.execute(
            "SELECT row FROM vectors WHERE fingerprint=? AND entry_id=?", (fp, eid)
        ).fetchone()

        bank.update(eid, object="Atlantis", text=bank.get(eid).text.replace(q["answer"], "Atlantis"))
        reader.refresh()  # what `memlm eval edit` calls: the new memory is encoded now
        new = reader.prompts([q["prompt"]]).memory.inputs
        j = new.entry_ids[0].index(eid)
        expect = reader.encode([bank.get(eid).text])
        torch.testing.assert_close(new.encoded.k[new.slots[0, j]], expect.k[0])

        bank.delete(eid)
        later = reader.prompts([q["prompt"]]).memory.inputs
        assert eid not in later.entry_ids[0] and eid not in reader.store._lru
        assert (
            bank.connection.execute("SELECT COUNT(*) FROM vectors WHERE entry_id=?", (eid,)).fetchone()[0]
            == 0
        )
        data = np.fromfile(reader.store._vector_cache().data_path, dtype=np.uint8).reshape(
            -1, reader.store.codec.nbytes
        )
        assert not data[row].any()  # the old memory's bytes are gone from the file, not only unmapped
        assert fp.startswith(PREFIX)


def test_save_load_round_trip(bios, bank_dir, tokenizer, tmp_path):
    model = m3_model(storage="int8")
    prompts = [r["prompt"] for r in qa(bios)[:3]]
    with MemoryBank.open(bank_dir) as bank:
        model.save_pretrained(tmp_path / "m", tokenizer=tokenizer, memory=memory_record("memory3", bank))
    with (
        Generator.from_pretrained(tmp_path / "m") as loaded,
        Generator(model, tokenizer, reader=load_reader(None, model, tokenizer, bank=bank_dir)) as gen,
    ):
        assert loaded.model.config.memory_options == model.config.memory_options
        a, b = gen.generate(prompts, max_new_tokens=12), loaded.generate(prompts, max_new_tokens=12)
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
        assert [g.retrieved for g in a] == [g.retrieved for g in b] and all(len(g.retrieved) == 3 for g in a)


# ---- training --------------------------------------------------------------------------------------


def test_two_stages_overlap_filter_and_swaps(bios, bank_dir, tokenizer):
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, m3_model(warmup_steps=5), tokenizer, bank=bank)
        reader.set_step(4)
        plain = reader.train_batch([QA_DOC])
        assert plain.memory is None and (plain.targets != -100).sum() == len(tokenizer.encode(QA_DOC)) + 1
        reader.set_step(5)
        assert reader.train_batch([QA_DOC]).memory is not None

        entry = next(iter(bank))
        for overlap, read in ((0.9, False), (1.0, True)):
            r = load_reader(None, m3_model(max_overlap=overlap), tokenizer, bank=bank)
            r.search = lambda queries, k=None: ([[entry.id]] * len(queries), [[1.0]] * len(queries))
            assert (entry.id in r.train_batch([entry.text + " And more."]).used[0]) == read

        r = load_reader(None, m3_model(swap_prob=1.0, k=6), tokenizer, bank=bank)
        person = [e for e in bank if e.subject == entry.subject]
        doc = " ".join(e.text for e in person)
        a = r.train_batch([doc], rng=random.Random(3))
        b = r.train_batch([doc], rng=random.Random(3))
        assert torch.equal(a.input_ids, b.input_ids)  # a function of the rng: resume stays exact
        text = tokenizer.decode(a.input_ids[0].tolist())
        refs = [tokenizer.decode(x) for x in refs_read(a.memory.inputs, 0, k=6)]
        swapped = [e for e in person if e.object not in text]
        assert len(swapped) >= 3
        for e in swapped:  # the memory says what the text says
            assert not any(e.object in ref for ref in refs)
            assert any(ref.startswith(e.text.split(e.object)[0]) for ref in refs)


def test_options_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match="storage"):
        m3_model(storage="fp8")
    with pytest.raises(ConfigError, match="memory_layers"):
        GPT(ModelConfig(vocab_size=400, n_layer=2, n_head=2, n_embd=32, memory="memory3", memory_layers=[2]))
    with pytest.raises(ConfigError, match="unknown"):
        m3_model(chunks=3)


def test_faiss_search_equals_exact(bios, bank_dir, tokenizer):
    prompts = [r["prompt"] for r in qa(bios)[:20]]
    with MemoryBank.open(bank_dir) as bank:
        exact = load_reader(None, m3_model(), tokenizer, bank=bank).prompts(prompts)
        flat = load_reader(None, m3_model(index="faiss", index_params={"spec": "Flat"}), tokenizer, bank=bank)
        assert flat.prompts(prompts).used == exact.used


@pytest.mark.slow
def test_two_stage_run_resumes_across_the_switch(bios, bank_dir, tokenizer, tmp_path):
    from memlm.config import load_config
    from memlm.train import Trainer

    tokenizer.save(tmp_path / "tok")

    def config(out):
        return load_config(None, [
            "--model.vocab_size", "400", "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32",
            "--model.block_size", "224", "--model.memory", "memory3",
            "--model.memory_options", json.dumps({**OPTIONS, "warmup_steps": 2, "swap_prob": 0.5, "storage": "int8", "copy_rows": 2}),
            "--data.train", str(bios / "corpus/train.jsonl"), "--data.bank", str(bank_dir),
            "--data.tokenizer", str(tmp_path / "tok"), "--data.val_fraction", "0.1",
            "--train.batch_size", "4", "--train.max_steps", "4", "--train.warmup_steps", "1",
            "--train.save_every", "2", "--train.eval_every", "2", "--train.eval_batches", "1",
            "--train.log_every", "1", "--train.progress", "false", "--out_dir", str(out),
        ])  # fmt: skip

    Trainer(config(tmp_path / "a")).fit()
    Trainer(config(tmp_path / "b")).fit(stop_at=3)  # "killed" in stage 2; the last checkpoint is from stage 1
    Trainer(config(tmp_path / "b")).fit(resume=True)
    losses = [
        [
            r["loss"]
            for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"
        ]
        for run in ("a", "b")
    ]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], abs=1e-6)
    a, b = GPT.from_pretrained(tmp_path / "a" / "final"), GPT.from_pretrained(tmp_path / "b" / "final")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)
    with Generator.from_pretrained(tmp_path / "a" / "final") as gen:  # reads the bank it trained with
        out = gen.generate([qa(bios)[0]["prompt"]], max_new_tokens=4)[0]
        assert out.retrieved and out.trace[0]["kind"] == "retrieve"


def test_namespaces_scope_what_is_read(bios, bank_dir, tokenizer):
    q = qa(bios)[2]
    with MemoryBank.open(bank_dir) as bank:
        twins = bank.add_many([
            {**{k: getattr(e, k) for k in ("text", "subject", "relation", "object")}, "namespace": "other"}
            for e in bank if e.subject == q["subject"]
        ])  # fmt: skip
        everything = load_reader(None, m3_model(k=12), tokenizer, bank=bank)
        assert set(twins) & set(everything.prompts([q["prompt"]]).used[0])
        scoped = load_reader(None, m3_model(k=12, namespaces=["bios"]), tokenizer, bank=bank)
        assert not set(twins) & set(scoped.prompts([q["prompt"]]).used[0])
        assert not set(twins) & set(scoped.train_batch([q["prompt"] + " " + q["answer"]]).used[0])


def test_teacher_forced_pick_and_query_noise(bios, bank_dir, tokenizer):
    q = qa(bios)[3]
    doc = f"{q['prompt']} {q['answer']}"
    with MemoryBank.open(bank_dir) as bank:
        gold = next(e.id for e in bank if (e.subject, e.relation) == (q["subject"], q["relation"]))
        others = [e.id for e in bank if e.subject == q["subject"] and e.id != gold][:2]

        def reader(**options):
            r = load_reader(None, m3_model(k=1, chunk=64, **options), tokenizer, bank=bank)
            r.search = lambda queries, k=None: ([[*others, gold]] * len(queries), [[1.0] * 3] * len(queries))
            return r

        assert reader().train_batch([doc]).used == [[others[0]]]  # the plain top 1
        picking = reader(train_pick=3)
        assert picking.train_batch([doc]).used == [[gold]]  # the one the answer names, among the top 3
        assert picking.train_batch([doc], train=False).used == [[others[0]]]  # never outside training
        assert picking.prompts([q["prompt"]]).used == [[others[0]]]

        noisy = reader(query_noise=1.0)
        clean, mixed = noisy.train_batch([doc], train=False), noisy.train_batch([doc], rng=random.Random(0))
        q_len = clean.query_len[0]
        assert (mixed.input_ids[0, 1:q_len] != clean.input_ids[0, 1:q_len]).all()  # the question is hidden
        assert torch.equal(mixed.input_ids[0, q_len:], clean.input_ids[0, q_len:])
        assert (
            torch.equal(mixed.targets, clean.targets) and mixed.used == clean.used
        )  # same answer, same read


def test_copy_rows_spell_a_read_reference_from_its_own_memory(bios, bank_dir, tokenizer):
    with MemoryBank.open(bank_dir) as bank:
        reader = load_reader(None, m3_model(copy_rows=2), tokenizer, bank=bank)
        reader.search = hashed_search(bank)
        texts = docs(bios, 3)
        plain = reader.train_batch(texts, train=False)
        batch = reader.train_batch(texts, rng=random.Random(0))
        assert batch.input_ids.shape[0] == len(texts) + 2 and plain.input_ids.shape[0] == len(texts)
        mem, T = batch.memory.inputs, batch.input_ids.shape[1]
        chunks = mem.slots.shape[1] // OPTIONS["k"]
        read = [ref for row in range(len(texts)) for c in range(chunks) for ref in refs_read(mem, c, row)]
        for row in (len(texts), len(texts) + 1):
            (ref,) = refs_read(mem, 0, row)  # one memory, in the chunk every position is in
            assert ref in read and (mem.chunk_of[row] == 0).all()
            n = len(ref)
            assert batch.input_ids[row, :n].tolist() == ref  # the row spells the reference it reads ...
            assert (
                batch.targets[row, : n - 1].tolist() == ref[1:]
            )  # ... and every token after BOS is a target
            assert batch.targets[row, n - 1] == tokenizer.eos_id and (batch.targets[row, n:] == -100).all()
            assert batch.used[row] and batch.used[row][0] in {e for u in batch.used[: len(texts)] for e in u}
        assert T == plain.input_ids.shape[1]
        logits = reader.model(batch.input_ids, memory=batch.memory).logits
        assert logits.shape[:2] == batch.input_ids.shape
