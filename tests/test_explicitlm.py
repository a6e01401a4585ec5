"""ExplicitLM: per-token retrieval (product keys over learned keys + Gumbel selection) and gated cross-attention.

Shapes, backward, the coarse stage's gradient, causality, the empty-memory identity, the product-key search
against exact search, edits that re-place an entry, deletions that leave nothing, gold labels and swaps,
the implicit region, save/load with the bank, and a CPU training run through the CLI.
"""

import json
import math
import random
import shutil

import pytest
import torch

from memlm.bank.store import MemoryBank
from memlm.errors import ConfigError
from memlm.generate import Generator
from memlm.model import GPT, ModelConfig
from memlm.model.memory.binding import load_reader, memory_record
from memlm.model.memory.explicitlm import ExplicitInputs
from memlm.model.memory.pk_search import ProductKeySearch

OPTIONS = {"key_dim": 16, "cell_size": 2, "n_cells": 4, "fine_k": 4, "swap_prob": 0.0}


@pytest.fixture
def bank(bank_dir, tmp_path):
    """A private copy: tests that edit it leave the module's bank alone."""
    shutil.copytree(bank_dir, tmp_path / "bank")
    with MemoryBank.open(tmp_path / "bank") as b:
        yield b


def docs(bios, n=6):
    return [json.loads(x)["text"] for x in (bios / "corpus/train.jsonl").read_text().splitlines()][:n]


def model(gate: float | None = 0.0, block_size: int = 160, **options) -> GPT:
    """gate None: the design's own initial gate (``gate_init``)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=400, n_layer=2, n_head=2, n_embd=32, block_size=block_size, memory="explicitlm",
        memory_layers=[1], memory_options={**OPTIONS, **options},
    )  # fmt: skip
    m = GPT(cfg)
    if gate is not None:
        m.blocks[1].cross.gate.data.fill_(gate)
    return m


def layer(m):
    return m.blocks[1].cross


def test_shapes_backward_and_provenance(bios, bank, tokenizer):
    m = model(gate=0.5).train()
    reader = load_reader(None, m, tokenizer, bank=bank)
    batch = reader.train_batch(docs(bios), rng=random.Random(0))
    out = m(batch.input_ids, targets=batch.targets, memory=batch.memory)
    B, T = batch.input_ids.shape
    assert out.logits.shape == (B, T, 400)
    ids = out.retrieval.retrieved_ids
    assert ids.shape == (B, T, 1)
    valid = batch.memory.inputs.valid
    assert (ids[~valid] == -1).all() and (ids[valid] >= 0).all()  # padding reads nothing
    assert set(ids[valid].unique().tolist()) <= {e.id for e in bank}
    assert {"explicitlm.1.retrieval", "explicitlm.1.similarity", "explicitlm.1.diversity"} <= set(
        out.retrieval.aux_losses
    )
    out.loss.backward()
    for name, p in m.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    cross = layer(m)
    for p in (cross.wq.weight, cross.wkv.weight, cross.wo.weight, cross.gate, m.memory.prev.weight):
        assert p.grad.abs().sum() > 0


def test_the_gate_starts_open_so_the_reading_learns(bios, bank, tokenizer):
    """A zero gate is a saddle: the reading's weights get gradient times tanh(0) = 0 (a 2,000-step run ended
    with the gate at 0.0012 and read nothing). The default starts open; the reading then gets gradient."""
    grads = {}
    for gate in (None, 0.0):
        m = model(gate=gate).train()
        reader = load_reader(None, m, tokenizer, bank=bank)
        batch = reader.train_batch(docs(bios), rng=random.Random(0))
        m(batch.input_ids, targets=batch.targets, memory=batch.memory).loss.backward()
        cross = layer(m)
        grads[gate] = [
            p.grad.abs().sum().item() for p in (cross.wq.weight, cross.wkv.weight, cross.wo.weight)
        ]
        if gate is None:
            assert math.tanh(cross.gate.item()) > 0.5
    assert min(grads[None]) > 0 and max(grads[0.0]) == 0.0


def test_all_keys_as_retrieval_negatives(bios, bank, tokenizer):
    """``retrieval_negatives: all`` adds every other cached key to the gold entry's softmax: the loss grows
    (more competitors, same weights and batch) and still trains the query."""
    losses = {}
    for negatives in ("batch", "all"):
        m = model(gate=0.5, retrieval_negatives=negatives).train()
        reader = load_reader(None, m, tokenizer, bank=bank)
        batch = reader.train_batch(docs(bios), rng=random.Random(0))
        out = m(batch.input_ids, targets=batch.targets, memory=batch.memory)
        losses[negatives] = out.retrieval.aux_losses["explicitlm.1.retrieval"]
    assert losses["all"].item() > losses["batch"].item() + 1e-3
    losses["all"].backward()
    assert layer(m).query.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="retrieval_negatives"):
        model(retrieval_negatives="every")


def test_teacher_forcing_reads_the_gold_entry_in_training_only(bios, bank, tokenizer):
    m = model(gate=0.5, teacher_forcing=1.0).train()
    reader = load_reader(None, m, tokenizer, bank=bank)
    batch = reader.train_batch(docs(bios), rng=random.Random(0))
    out = m(batch.input_ids, targets=batch.targets, memory=batch.memory)
    gold = batch.memory.inputs.gold
    at = gold >= 0
    read = out.retrieval.retrieved_ids[..., 0]
    assert at.sum() > 10 and torch.equal(read[at], reader.table.ids[gold[at]])
    base = model(gate=0.5).train()  # the same weights without forcing: the search alone misses some
    out = base(batch.input_ids, targets=batch.targets, memory=batch.memory)
    assert not torch.equal(out.retrieval.retrieved_ids[..., 0][at], reader.table.ids[gold[at]])
    with torch.no_grad():  # inference reads what the search found, golds or not
        forced, plain = (
            x.eval()(batch.input_ids, memory=batch.memory).retrieval.retrieved_ids for x in (m, base)
        )
    assert torch.equal(forced, plain)
    with pytest.raises(ConfigError, match="teacher_forcing"):
        model(teacher_forcing=1.5)


@pytest.mark.parametrize("loss", ["lm", "retrieval"])
def test_coarse_stage_gets_gradient_in_query_projection_and_key_encoder(bios, bank, tokenizer, loss):
    """The public code's product keys get no gradient; here the fine stage scores the coarse candidates with
    fresh keys, so the language-model loss alone (through the straight-through weights) and the retrieval loss
    alone both reach the query projection and the key encoder."""
    lm_only = {"retrieval_weight": 0.0, "similarity_weight": 0.0, "diversity_weight": 0.0}
    m = model(gate=0.5 if loss == "lm" else 0.0, **(lm_only if loss == "lm" else {})).train()
    reader = load_reader(None, m, tokenizer, bank=bank)
    batch = reader.train_batch(docs(bios), rng=random.Random(0))
    out = m(batch.input_ids, targets=batch.targets, memory=batch.memory)
    if loss == "lm":
        assert not out.retrieval.aux_losses
        out.loss.backward()
    else:
        out.retrieval.aux_losses["explicitlm.1.retrieval"].backward()
    enc = m.memory
    for p in (layer(m).query.weight, enc.key_out.weight, enc.key_gate, enc.key_mlp[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_retrieval_loss_teaches_the_query_to_find_the_gold_entry(bios, bank, tokenizer):
    """A few steps of the auxiliary loss alone move the gold entry up: the coarse stage is trained, not random."""
    m = model(similarity_weight=0.0, diversity_weight=0.0, refresh_every=5).train()
    reader = load_reader(None, m, tokenizer, bank=bank)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    texts = docs(bios, 8)

    def gold_rank() -> float:
        batch = reader.train_batch(texts)
        at = batch.memory.inputs.gold >= 0
        with torch.no_grad():
            x = m.wte(batch.input_ids)
            cos, sin = m.rope(torch.arange(x.shape[1])[None])
            x = m.blocks[0](x, cos, sin, None, None, None)
            h = m.blocks[1].attn(m.blocks[1].attn_norm(x), cos, sin, mask=None) + x
            q = torch.nn.functional.normalize(layer(m).query(m.blocks[1].cross_norm(h)), dim=-1)[at]
            keys = reader.table.encode_keys(m.memory, m.wte)
            gold = batch.memory.inputs.gold[at]
            scores = q @ keys[reader.table.alive].T
            own = (q * keys[gold]).sum(-1, keepdim=True)
        return (scores > own).float().sum(1).mean().item()

    before = gold_rank()
    for _ in range(15):
        batch = reader.train_batch(texts)
        out = m(batch.input_ids, targets=batch.targets, memory=batch.memory)
        opt.zero_grad()
        out.retrieval.aux_losses["explicitlm.1.retrieval"].backward()
        opt.step()
    assert gold_rank() < before / 4


@pytest.mark.parametrize("training", [False, True])
def test_later_tokens_never_change_earlier_logits(bios, bank, tokenizer, training):
    m = model(gate=0.5).train(training)
    reader = load_reader(None, m, tokenizer, bank=bank)
    doc = docs(bios, 2)[1]
    a = reader.train_batch([doc], train=False)
    b = reader.train_batch(
        [doc[: len(doc) // 2] + " Someone else did something else in Atlantis."], train=False
    )
    n = min(a.input_ids.shape[1], b.input_ids.shape[1])
    cut = int(torch.nonzero(a.input_ids[0, :n] != b.input_ids[0, :n])[0])
    torch.manual_seed(1)  # the same Gumbel noise for the shared prefix
    la = m(a.input_ids[:, :n], memory=reader.context(gold=a.memory.inputs.gold[:, :n])).logits
    torch.manual_seed(1)
    lb = m(b.input_ids[:, :n], memory=reader.context(gold=b.memory.inputs.gold[:, :n])).logits
    torch.testing.assert_close(la[:, :cut], lb[:, :cut], atol=1e-5, rtol=0)
    assert not torch.allclose(la[:, cut:], lb[:, cut:], atol=1e-3)


def test_gold_labels_never_change_what_is_read(bios, bank, tokenizer):
    """The gold entry feeds the auxiliary loss only: the tokens a position is trained to predict never
    reach its retrieval."""
    m = model(gate=0.5).train()
    reader = load_reader(None, m, tokenizer, bank=bank)
    batch = reader.train_batch(docs(bios), train=False)
    torch.manual_seed(1)
    a = m(batch.input_ids, memory=batch.memory)
    ids_a = a.retrieval.retrieved_ids.clone()
    other = reader.context(
        gold=torch.randint(0, len(reader.table), batch.input_ids.shape), valid=batch.memory.inputs.valid
    )
    torch.manual_seed(1)
    b = m(batch.input_ids, memory=other)
    assert torch.equal(ids_a, b.retrieval.retrieved_ids)  # the same entries read
    torch.testing.assert_close(
        a.logits, b.logits, atol=1e-5, rtol=0
    )  # (keys batched differently: float noise)


def test_closed_gate_or_empty_bank_gives_exactly_the_base_model(bios, bank, tokenizer):
    m = model(gate=0.0).eval()
    reader = load_reader(None, m, tokenizer, bank=bank)
    x = reader.train_batch(docs(bios), train=False).input_ids
    base = m(x).logits
    dense = GPT(ModelConfig(vocab_size=400, n_layer=2, n_head=2, n_embd=32, block_size=160)).eval()
    dense.load_state_dict({k: v for k, v in m.state_dict().items() if k in dense.state_dict()})
    assert torch.equal(dense(x).logits, base)
    assert torch.equal(m(x, memory=reader.prompts(["x"]).memory).logits, base)  # closed gate
    layer(m).gate.data.fill_(0.5)
    assert not torch.allclose(m(x, memory=reader.prompts(["x"]).memory).logits, base, atol=1e-3)  # it reads
    bank.delete([e.id for e in bank])
    memory = reader.prompts(["x"]).memory  # refreshes: every row dead
    assert reader.table.n_explicit == 0
    out = m(x, memory=memory)
    assert torch.equal(out.logits, base) and (out.retrieval.retrieved_ids == -1).all()


def test_product_keys_equal_exact_search_when_every_cell_is_searched_and_find_most_otherwise():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(50, 32, generator=g), dim=1)
    keys = torch.nn.functional.normalize(
        centers.repeat(40, 1) + 0.3 * torch.randn(2000, 32, generator=g), dim=1
    )
    alive = torch.ones(2000, dtype=torch.bool)
    alive[::7] = False  # dead rows are never found
    q = torch.nn.functional.normalize(keys[:300] + 0.05 * torch.randn(300, 32, generator=g), dim=1)
    s = ProductKeySearch(32, cell_size=8, topk_half=4, n_cells=8, cell_cap=10_000)
    s.fit(keys, alive)
    K = s.n_keys
    assert K == math.ceil(math.sqrt(alive.sum() / 8)) and s.unreachable == 0
    exact_s, exact_r = s.exact(q, 5)
    approx_s, approx_r = s.search(q, 5)
    assert (approx_r[:, 0] == exact_r[:, 0]).float().mean() > 0.9  # O(sqrt N) search, high recall
    assert not torch.isin(approx_r, torch.nonzero(~alive).flatten()).any()
    full = ProductKeySearch(32, cell_size=8, topk_half=K, n_cells=K * K, cell_cap=10_000)
    full.fit(keys, alive)
    full_s, full_r = full.search(q, 5)
    assert torch.equal(full_r, exact_r)
    torch.testing.assert_close(full_s, exact_s)
    # candidates per query: n_cells * cap, not N
    assert s.candidates(q).shape[1] == 8 * s.cap < 2000 / 4
    # one query scores its few distinct candidates with one matmul; the batch (1,715 distinct, more than the
    # copies cost) scores each query's own copy of its candidates: the same numbers
    for i in range(0, 300, 37):
        one_s, one_r = s.search(q[i : i + 1], 5)
        assert torch.equal(one_r[0], approx_r[i])
        torch.testing.assert_close(one_s[0], approx_s[i])


def test_a_crowded_cell_spills_into_the_next_best_cells_so_every_row_stays_findable():
    g = torch.Generator().manual_seed(0)
    spread = torch.nn.functional.normalize(torch.randn(200, 32, generator=g), dim=1)
    crowd = torch.nn.functional.normalize(spread[0] + 0.01 * torch.randn(60, 32, generator=g), dim=1)
    s = ProductKeySearch(32, cell_size=8, topk_half=6, n_cells=16, cell_cap=8)
    s.fit(torch.cat([spread, crowd]), torch.ones(260, dtype=torch.bool))
    assert s.unreachable == 0 and int(s.count.max()) <= 8  # 61 near-identical keys: no cell holds them all
    found = s.candidates(crowd.mean(0, keepdim=True))[0]
    assert torch.isin(torch.tensor([0, *range(200, 260)]), found).float().mean() > 0.9


def test_keys_spell_the_subject_as_a_question_does(bios, bank, tokenizer):
    # BPE splits a word at the start of a string otherwise than after a space: a key tokenised bare would spell
    # its subject's first name otherwise than every question, and the query could not match on it.
    reader = load_reader(None, model().eval(), tokenizer, bank=bank)
    assert_keys_spell_subjects(
        bios, tokenizer, bank, lambda e: reader.table.key_tokens[reader._row_of[e.id]].tolist()
    )


def test_parts_keys_have_one_half_per_subject_and_one_per_relation(bios, bank, tokenizer):
    """key: parts — the product keys' halves are the subject's and the relation's: a person's entries share
    the first half, a relation's entries the second; both halves learn from the retrieval loss."""
    texts = [bank.add("An entry without a triple."), bank.add("Another note, about the weather.")]
    m = model(key="parts", similarity_weight=0.0, diversity_weight=0.0).train()
    reader = load_reader(None, m, tokenizer, bank=bank)
    keys = reader.table.encode_keys(m.memory, m.wte)
    assert_halves(bank, keys, reader._row_of, texts, half=8)
    batch = reader.train_batch(docs(bios), rng=random.Random(0))
    m(batch.input_ids, targets=batch.targets, memory=batch.memory).retrieval.aux_losses[
        "explicitlm.1.retrieval"
    ].backward()
    enc = m.memory
    for p in (layer(m).query.weight, enc.key_out.weight, enc.relation_out.weight, enc.relation_gate):
        assert p.grad is not None and p.grad.abs().sum() > 0


def assert_halves(bank, keys, row_of, texts, *, half: int) -> None:
    """Unit keys whose first half is shared by a subject's entries and second half by a relation's, each half
    telling the others apart; entries ``texts`` (no triple) get both halves from their own text."""
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(len(keys)))
    groups: dict[tuple[str, str], list[int]] = {}
    for e in bank.iter_entries():
        if e.subject:
            groups.setdefault(("subject", e.subject), []).append(row_of[e.id])
            groups.setdefault(("relation", e.relation), []).append(row_of[e.id])
    for (kind, _), rows in groups.items():
        own, other = (slice(0, half), slice(half, None))[:: 1 if kind == "subject" else -1]
        k = keys[rows]
        torch.testing.assert_close(k[:, own], k[:1, own].expand_as(k[:, own]))  # the shared half
        assert (k[1:, other] - k[:1, other]).abs().amax(-1).min() > 1e-4  # the other half tells them apart
    a, b = keys[[row_of[i] for i in texts]]
    assert (a[:half] - b[:half]).abs().max() > 1e-4 and (a[half:] - b[half:]).abs().max() > 1e-4


def assert_keys_spell_subjects(bios, tokenizer, bank, key_tokens) -> None:
    """For a few questions: the subject's tokens (as the question has them) occur in its entry's key tokens."""

    def contains(ids: list[int], part: list[int]) -> bool:
        return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))

    for line in (bios / "qa/unseen.jsonl").read_text().splitlines()[:6]:
        q = json.loads(line)
        name = tokenizer.encode(" " + q["subject"])
        assert contains(tokenizer.encode(q["prompt"]), name)
        entry = next(
            e for e in bank.iter_entries() if e.subject == q["subject"] and e.relation == q["relation"]
        )
        key = key_tokens(entry)
        assert contains(key, name), (tokenizer.decode(key), q["subject"])


def test_an_edit_re_places_the_entry_and_a_deletion_leaves_nothing(bios, bank, tokenizer):
    m = model().eval()
    reader = load_reader(None, m, tokenizer, bank=bank)
    reader.prompts(["x"])  # keys and cells built
    table, search = reader.table, reader.table.search
    entry = next(e for e in bank if e.relation == "employer")
    row = reader._row_of[entry.id]
    old_key, old_cell, old_text = (
        search.keys[row].clone(),
        int(search.cell[row]),
        table.text_tokens[row].clone(),
    )
    # The key is made from what the entry is about: a new object changes what is read, not where it sits.
    bank.update(entry.id, object="Zebra Works")
    assert reader.refresh() == 1
    torch.testing.assert_close(search.keys[row], old_key)
    assert not torch.equal(table.text_tokens[row], old_text)
    assert "Zebra Works" in tokenizer.decode(table.text_tokens[row].tolist())
    # A new subject is a new key: the entry moves to the cell of its new key, and is found by it.
    bank.update(entry.id, subject="Quentin X. Zanzibar")
    reader.refresh()
    new_key = search.keys[row]
    fresh = table.encode_keys(m.memory, m.wte, torch.tensor([row]))[0]
    torch.testing.assert_close(new_key, fresh)
    assert not torch.allclose(new_key, old_key) and int(search.cell[row]) == int(
        search.cells_of(new_key[None])[0]
    )
    assert search.search(new_key[None], 1)[1][0, 0] == row
    assert int(search.cell[row]) != old_cell or search.n_keys == 1
    assert "Quentin X. Zanzibar" in reader._by_subject and reader._facts[row].subject == "Quentin X. Zanzibar"
    # Deleted: the row is dead, its tokens gone, its token cache dropped; no query can return it.
    victims = [e for e in bank if e.subject == entry.subject or e.id == entry.id]
    hashes = {e.content_hash for e in victims}
    bank.delete([e.id for e in victims])
    reader.refresh()
    rows = torch.tensor([reader._row_of.get(e.id, -1) for e in victims])
    assert (rows == -1).all()
    dead = ~table.alive
    assert dead.sum() == len(victims)
    assert (table.text_tokens[dead] == tokenizer.pad_id).all() and (
        table.key_tokens[dead] == tokenizer.pad_id
    ).all()
    assert (table.ids[dead] == -1).all() and not (set(reader._tokens) & hashes)
    assert not search.alive[dead].any() and not torch.isin(search.order, torch.nonzero(dead).flatten()).any()
    _, found = search.exact(search.keys[dead], 3)
    assert not torch.isin(found, torch.nonzero(dead).flatten()).any()


def test_gold_labels_point_at_the_objects_and_swaps_change_entry_and_text_alike(bios, bank, tokenizer):
    m = model(swap_prob=1.0, block_size=512).train()  # no document is cut
    reader = load_reader(None, m, tokenizer, bank=bank)
    texts = [d for d in docs(bios, 40) if not d.startswith("Q:")][:3] + [
        d for d in docs(bios, 40) if d.startswith("Q:")
    ][:3]
    plain = reader.train_batch(texts, train=False)
    assert plain.memory.inputs.swap_rows.numel() == 0
    inputs = plain.memory.inputs
    for b in range(len(texts)):
        labelled = torch.nonzero(inputs.gold[b] >= 0).flatten()
        assert len(labelled)
        for pos in labelled.tolist():
            entry = bank.get(int(reader.table.ids[inputs.gold[b, pos]]))
            piece = tokenizer.decode([int(plain.targets[b, pos])]).strip()
            assert piece and piece in entry.object  # the target token spells the labelled entry's object
            assert entry.subject in texts[b]
    swapped = reader.train_batch(texts, rng=random.Random(0))
    s = swapped.memory.inputs
    assert (s.swap_rows >= 0).sum() >= 3
    for b in range(len(texts)):
        doc = tokenizer.decode(swapped.input_ids[b].tolist())
        for j in torch.nonzero(s.swap_rows[b] >= 0).flatten().tolist():
            entry = bank.get(int(reader.table.ids[s.swap_rows[b, j]]))
            new_text = tokenizer.decode(s.swap_tokens[b, j].tolist())
            assert new_text != entry.text and entry.object not in new_text
            new_obj = new_text[len(entry.text) - len(entry.object) - 1 : -1]
            assert new_obj in doc and entry.object not in doc


def test_implicit_region_is_a_flagged_store_the_optimiser_trains_and_the_bank_is_never_rewritten(
    bios, bank, tokenizer
):
    assert model().memory.implicit is None  # ratio 0: no slots at all
    m = model(gate=0.5, implicit_ratio=0.5, bank_size=len(bank)).train()
    slots = m.memory.implicit
    assert slots.flag == "implicit" and slots.keys.shape == (len(bank), 16)
    reader = load_reader(None, m, tokenizer, bank=bank)
    before = bank.content_fingerprint()
    batch = reader.train_batch(docs(bios), rng=random.Random(0))
    tokens = reader.table.text_tokens[reader.table.M :].clone()
    # Make every query find a slot: slot keys = the queries' own direction.
    with torch.no_grad():
        slots.keys.copy_(layer(m).query.weight.sum(1).expand_as(slots.keys))
    reader.refresh_keys()
    out = m(batch.input_ids, targets=batch.targets, memory=batch.memory)
    ids = out.retrieval.retrieved_ids[batch.memory.inputs.valid]
    assert (ids <= -2).any()  # slots are read, reported apart from bank ids (-2 - slot)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    old = slots.states.detach().clone()
    out.loss.backward()
    opt.step()
    assert not torch.equal(slots.states, old)  # the optimiser trains the slots ...
    assert torch.equal(reader.table.text_tokens[reader.table.M :], tokens)  # ... never the bank's entries
    assert bank.content_fingerprint() == before


def test_save_and_load_with_the_bank(bios, bank, tokenizer, tmp_path):
    m = model(gate=0.5).eval()
    m.memory.step.fill_(7)
    folder = tmp_path / "model"
    m.save_pretrained(folder, tokenizer=tokenizer, memory=memory_record("explicitlm", bank))
    prompts = [json.loads(x)["prompt"] for x in (bios / "qa/unseen.jsonl").read_text().splitlines()[:4]]
    ours = Generator(m, tokenizer, reader=load_reader(None, m, tokenizer, bank=bank)).generate(
        prompts, max_new_tokens=4
    )
    with Generator.from_pretrained(folder) as gen:
        assert int(gen.model.memory.step) == 7 and gen.reader.bank.path.resolve() == bank.path.resolve()
        theirs = gen.generate(prompts, max_new_tokens=4)
    for a, b in zip(ours, theirs):
        assert a.text == b.text and a.retrieved == b.retrieved and a.retrieved
        assert a.trace[0]["kind"] == "read"


def test_bad_options_are_config_errors():
    for bad, match in [({"key": "object"}, "key must be one of"), ({"key_dim": 15}, "key_dim"),
                       ({"read_k": 9, "fine_k": 8}, "read_k"), ({"implicit_ratio": 0.5}, "bank_size"),
                       ({"nope": 1}, "nope")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            ModelConfig(memory="explicitlm", memory_options=bad)
    with pytest.raises(ConfigError, match="memory_layers"):
        GPT(ModelConfig(n_layer=2, n_embd=32, memory="explicitlm", memory_layers=[5]))


def test_namespaces_scope_the_table(bios, bank, tokenizer):
    from memlm.bank.store import BankError

    other = bank.add("Zed Q. Nobody works for Nowhere Ltd.", subject="Zed Q. Nobody", relation="employer",
                     object="Nowhere Ltd", namespace="other")  # fmt: skip
    m = model(namespaces=["bios"])
    reader = load_reader(None, m, tokenizer, bank=bank)
    assert other not in reader._row_of and reader.table.n_explicit == len(bank) - 1
    with pytest.raises(BankError, match="no entries in namespaces"):
        load_reader(None, model(namespaces=["geo"]), tokenizer, bank=bank)
    assert isinstance(reader.prompts(["x"]).memory.inputs, ExplicitInputs)


@pytest.mark.slow
def test_cpu_training_run_through_the_cli(bios, bank_dir, tmp_path, memory_train_args):
    from memlm.cli import main

    out = tmp_path / "run"
    options = json.dumps({**OPTIONS, "swap_prob": 0.5, "refresh_every": 2})
    args = memory_train_args("explicitlm", options, bios / "corpus/train.jsonl", bank_dir, out)
    assert main(args) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r.get("loss", r.get("val_loss")))) for r in metrics)
    aux = [r["aux_losses"] for r in metrics if r["kind"] == "train"]  # logged apart from the total
    assert aux and all({"explicitlm.1.retrieval", "explicitlm.1.similarity"} <= set(a) for a in aux)
    assert json.loads((out / "final/memory.json").read_text())["design"] == "explicitlm"
    assert main(["eval", "qa", "--model", str(out / "final"), "--data", str(bios), "--split", "unseen",
                 "--limit", "6", "--max-new-tokens", "4"]) == 0  # fmt: skip
    report = json.loads((out / "final/eval/qa_unseen.json").read_text())
    assert report["retrieval"]["n"] == 6


def test_state_next_gives_a_token_state_the_token_after_it(bios, bank, tokenizer):
    """With ``state_next`` the state of "for" in "works for Maple Motors." knows "Maple" (the value's first
    token); without it a state knows only what precedes it."""
    tokens = torch.tensor([tokenizer.encode("Ada works for Maple Motors.")])
    other = tokens.clone()
    j = 2  # change the token after position j
    other[0, j + 1] = tokenizer.encode(" Blue")[0]
    for on in (False, True):
        m = model(state_next=on)
        a, b = (m.memory.states(t, m.wte, tokenizer.pad_id) for t in (tokens, other))
        changed = (a - b).abs().amax(-1)[0] > 1e-6
        assert not changed[:j].any() and changed[j + 1] and bool(changed[j]) == on
        padded = torch.cat([tokens, torch.full((1, 3), tokenizer.pad_id)], 1)
        torch.testing.assert_close(m.memory.states(padded, m.wte, tokenizer.pad_id)[:, : tokens.shape[1]], a)
    m = model(gate=0.5, state_next=True).train()
    batch = load_reader(None, m, tokenizer, bank=bank).train_batch(docs(bios), rng=random.Random(0))
    m(batch.input_ids, targets=batch.targets, memory=batch.memory).loss.backward()
    assert m.memory.next.weight.grad.abs().sum() > 0


def test_query_encoder_retrieves_by_the_question_once_it_is_read(bios, bank, tokenizer):
    """``query_encoder``: positions that have read the text's first sentence read its encoder's top entries over
    that encoder's vectors of the entries' keys; earlier positions keep the learnt query, which alone the
    retrieval losses teach; edits and deletions reach the text keys."""
    from memlm.encode import load_encoder
    from memlm.model.memory.question import key_text

    encoder = load_encoder("hashing")
    m = model(gate=0.5, query_encoder="hashing", retrieval_weight=1.0, similarity_weight=0.0).train()
    reader = load_reader(None, m, tokenizer, bank=bank)
    table = reader.table
    rows = torch.arange(table.M, len(table))
    want = encoder.encode([key_text(e, "about") for e in bank.get_many(table.ids[rows].tolist())])
    torch.testing.assert_close(table.text_keys[rows], torch.from_numpy(want))
    batch = reader.train_batch(docs(bios), rng=random.Random(0))
    inputs = batch.memory.inputs
    read = inputs.text_mask & inputs.valid
    assert read.any() and (inputs.valid & ~read).any()
    sims = inputs.text @ table.text_keys.T  # (B, rows): the question's own search, exact
    m.eval()
    with torch.no_grad():
        got = m(batch.input_ids, memory=batch.memory).retrieval.retrieved_ids[..., 0]  # (B, T)
        # elsewhere: exactly what the same weights read without a query encoder
        plain = model(gate=0.5, retrieval_weight=1.0, similarity_weight=0.0).eval()
        plain.load_state_dict(m.state_dict())
        plain_reader = load_reader(None, plain, tokenizer, bank=bank)
        plain_reader.refresh_keys()
        context = plain_reader.context(valid=inputs.valid)
        base = plain(batch.input_ids, memory=context).retrieval.retrieved_ids[..., 0]
    row_of = {int(i): r for r, i in enumerate(table.ids.tolist()) if i >= 0}
    b = torch.arange(len(got))[:, None].expand_as(got)[read]
    picked = sims[b, torch.tensor([row_of[int(i)] for i in got[read]])]
    assert torch.equal(picked, sims.max(-1).values[b])  # its best entry (ties: either)
    assert torch.equal(got[inputs.valid & ~read], base[inputs.valid & ~read])
    assert not torch.equal(got[read], base[read])

    # The retrieval loss teaches the learnt query only: golds after the question add none of it.
    m.train()
    gold = inputs.gold.clone()
    for where, loss in ((read, False), (~read, True)):
        inputs.gold, batch.memory.aux_losses = gold.masked_fill(~where, -1), {}
        assert (inputs.gold >= 0).any()
        m(batch.input_ids, memory=batch.memory)
        assert ("explicitlm.1.retrieval" in batch.memory.aux_losses) == loss

    # A prompt reads the entry its question is about; once deleted, the question never finds it again.
    m.eval()
    prompt = "Q: Where was Laura F. Glenholm born?\nA:"
    q = torch.from_numpy(encoder.encode(["Q: Where was Laura F. Glenholm born?"])[0])
    target = int(table.ids[(table.text_keys @ q).masked_fill(table.ids < 0, -1e9).argmax()])
    first = Generator(m, tokenizer, reader=reader).generate([prompt], max_new_tokens=2)[0]
    assert target in first.retrieved
    gone = int((reader.table.ids == target).nonzero())
    bank.delete([target])
    again = Generator(m, tokenizer, reader=reader).generate([prompt], max_new_tokens=2)[0]
    assert target not in again.retrieved
    assert gone not in reader.table.search_text(q[None], len(reader.table))[1].tolist()  # its row: dead


def test_decoding_steps_reuse_the_read_entries_states_until_they_change(bios, bank, tokenizer, monkeypatch):
    m = model(gate=0.5, query_encoder="hashing").eval()
    reader = load_reader(None, m, tokenizer, bank=bank)
    batch = reader.prompts(["Q: Where was Laura F. Glenholm born?\nA:"])
    x = torch.tensor(batch.token_ids)
    calls = []
    states = m.blocks[1].cross.encoder.states
    monkeypatch.setattr(m.blocks[1].cross.encoder, "states", lambda *a: calls.append(1) or states(*a))
    with torch.no_grad():
        first = m(x, memory=batch.memory).logits
        again = m(x, memory=batch.memory).logits  # the same entries read: their states are kept
        assert len(calls) == 1
        torch.testing.assert_close(again, first)
        layer(m).wkv.weight.mul_(2.0)  # an in-place update, as an optimizer makes
        after = m(x, memory=batch.memory).logits
        assert len(calls) == 2
    fresh = m(x, memory=batch.memory).logits.detach()  # with gradient: never kept
    assert not torch.allclose(after, first)
    torch.testing.assert_close(after, fresh)
    with torch.no_grad():  # the entries' tokens rewritten in place (as an edit does): computed again
        reader.table.text_tokens.copy_(reader.table.text_tokens.roll(1, 0))
        edited = m(x, memory=batch.memory).logits
        assert len(calls) == 4 and not torch.allclose(edited, after)


def test_cue_noise_replaces_cue_words_but_never_the_name_or_the_answer(bios, bank, tokenizer):
    from memlm.data.pack import IGNORE_INDEX

    texts = [d for d in docs(bios, 40) if d.startswith("Q:")][:3] + [
        d for d in docs(bios, 40) if not d.startswith("Q:")
    ][:3]
    plain = load_reader(None, model(), tokenizer, bank=bank).train_batch(texts, rng=random.Random(0))
    reader = load_reader(None, model(cue_noise=1.0), tokenizer, bank=bank)
    noisy = reader.train_batch(texts, rng=random.Random(0))
    assert torch.equal(reader.train_batch(texts).input_ids, plain.input_ids)  # no rng (evaluation): none
    changed = noisy.input_ids != plain.input_ids
    gold = plain.memory.inputs.gold
    assert torch.equal(noisy.memory.inputs.gold, gold)  # objects keep their tokens
    for b, text in enumerate(texts):
        first_object = int((gold[b] >= 0).float().argmax()) + 1  # position t's gold labels token t + 1
        assert changed[b, 1:first_object].any() and not changed[b, first_object:].any()
        subject = reader._subjects(text)[0]
        assert subject in tokenizer.decode(noisy.input_ids[b, :first_object].tolist())  # the name is kept
        gone = torch.nonzero(changed[b]).flatten()
        assert len(gone) and (noisy.targets[b, gone - 1] == IGNORE_INDEX).all()  # a random token: no target
        kept = torch.nonzero(~changed[b][1:]).flatten()
        torch.testing.assert_close(noisy.targets[b, kept], plain.targets[b, kept])
    with pytest.raises(ConfigError, match="cue_noise"):
        model(cue_noise=1.5)
