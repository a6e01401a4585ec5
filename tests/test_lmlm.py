"""LMLM: the loss mask, unknown lookups in training, lookups forced into the cached decode (a value in one forward
token, batched rows pausing at different steps), equality with values already in the prompt and with the
public code's regenerate-from-scratch decode, unknown facts, namespaces, deletion through aliases and
near-duplicate spellings, the trace, save/load and a training step."""

import json
import random
import re

import pytest
import torch

from memlm.bank.store import MemoryBank
from memlm.data.annotate import annotate_ids, parse_calls
from memlm.errors import ConfigError
from memlm.generate import GenerationConfig, Generator, decode
from memlm.model import GPT, ModelConfig
from memlm.model.memory.binding import load_reader, memory_record
from memlm.model.memory.lmlm import decode_regenerating, scheduled_calls
from memlm.model.memory.reader import PromptBatch
from memlm.tokenizer import DB_END, DB_ENTITY, DB_RELATIONSHIP, DB_RETURN, Tokenizer

# lookup_steps 0: decodes run exactly max_new_tokens steps, as the token-by-token comparisons below assume
OPTIONS = {"encoder": "hashing:256", "threshold": 0.5, "unknown_prob": 0.0, "lookup_steps": 0}


@pytest.fixture
def bank(bank_dir, tmp_path):
    """A private copy: tests that edit or delete never disturb the others."""
    import shutil

    shutil.copytree(bank_dir, tmp_path / "bank")
    with MemoryBank.open(tmp_path / "bank") as b:
        yield b


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def docs(bios):
    return [d["text"] for d in lines(bios / "corpus/train_lmlm.jsonl")]


@pytest.fixture(scope="module")
def tokenizer(bios, docs):
    return Tokenizer.train(docs + [f["text"] for f in lines(bios / "facts.jsonl")], vocab_size=400)


def lmlm_model(**options) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=400, n_layer=2, n_head=2, n_embd=32, block_size=512, init_std=0.3, memory="lmlm",
        memory_options={**OPTIONS, **options},
    )  # fmt: skip
    return GPT(cfg).eval()


def call_ids(tokenizer, entity, relation):
    """``<|db_entity|> E<|db_relationship|> R<|db_return|>`` as the model would write it."""
    return tokenizer.encode(f"{DB_ENTITY} {entity}{DB_RELATIONSHIP} {relation}{DB_RETURN}")


def script(tokenizer, plan):
    """Hook factory: row i writes calls, plan = {row: [(n, entity, relation)]}, each once the row has n tokens
    and nothing forced. The reader's hook (which runs first) sees ``<|db_return|>`` and answers it."""
    rows = max(plan) + 1
    schedule = [{n: call_ids(tokenizer, e, r) for n, e, r in plan.get(i, [])} for i in range(rows)]
    return lambda: scheduled_calls(schedule)


class CountingModel(torch.nn.Module):
    """Wraps a GPT and records the width of every forward call."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.widths = model, model.config, []

    def forward(self, input_ids, *args, **kw):
        self.widths.append(tuple(input_ids.shape))
        return self.inner(input_ids, *args, **kw)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


# ---- options and training ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [({"threshold": 0}, "threshold"), ({"unknown_prob": 2}, "unknown_prob"), ({"unknown": " "}, "unknown"),
     ({"max_call_tokens": 2}, "max_call_tokens"), ({"k": 3}, "k")],
)  # fmt: skip
def test_bad_options_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        lmlm_model(**options)


def test_train_batch_masks_values_and_db_end(bank, tokenizer, docs):
    reader = load_reader(None, lmlm_model(), tokenizer, bank=bank)
    doc = next(d for d in docs if not d.startswith("Q:"))
    qa = next(d for d in docs if d.startswith("Q:"))
    batch = reader.train_batch([doc, qa])
    ids, mask = annotate_ids(tokenizer, doc)
    row = batch.input_ids[0, : len(ids) + 1].tolist()
    assert row == [tokenizer.bos_id, *ids]
    targets = batch.targets[0].tolist()
    target_of = {t: targets[t - 1] for t in range(1, len(ids) + 2)}  # token position -> its target slot
    for pos, (tid, keep) in enumerate(zip(ids, mask), start=1):
        assert target_of[pos] == (tid if keep else -100), (
            pos,
            tokenizer.decode([tid], skip_special_tokens=False),
        )
    assert target_of[len(ids) + 1] == tokenizer.eos_id
    end = tokenizer.token_id(DB_END)
    counted = [t for t in targets if t != -100]
    assert end not in counted and tokenizer.token_id(DB_RETURN) in counted
    assert len(parse_calls(doc)) == 6 and counted.count(tokenizer.token_id(DB_ENTITY)) == 6
    # what is learnt: the document without the looked-up values (their repeat after each call stays)
    text = tokenizer.decode(counted, skip_special_tokens=False)
    assert text == re.sub(re.escape(DB_RETURN) + ".*?" + re.escape(DB_END), DB_RETURN, doc) + "<|eos|>"
    assert (batch.targets[1] != -100).sum() > 0  # the short row is padded, not lost


def test_training_values_are_what_the_bank_returns_and_later_tokens_never_change_earlier_logits(
    bank, tokenizer, docs
):
    """The value a training position reads is a function of the (E, R) before it, exactly as at inference."""
    model = lmlm_model()
    reader = load_reader(None, model, tokenizer, bank=bank)
    for doc in docs[:40]:
        for c in parse_calls(doc):
            answer = reader.lookup(c.entity, c.relation)
            assert (answer.value, answer.how) == (c.value, "exact")
    doc = next(d for d in docs if not d.startswith("Q:"))
    cut = doc.index(DB_RETURN) + len(DB_RETURN)
    other = doc[:cut] + " Atlantis" + DB_END + " Atlantis. Nothing else is the same."
    x1, x2 = reader.train_batch([doc]).input_ids, reader.train_batch([other]).input_ids
    n = min(x1.shape[1], x2.shape[1])
    first = int(torch.nonzero(x1[0, :n] != x2[0, :n])[0])
    assert torch.equal(model(x1[:, :n]).logits[:, :first], model(x2[:, :n]).logits[:, :first])


def test_unknown_lookups_in_training(bank, tokenizer, docs):
    reader = load_reader(None, lmlm_model(unknown_prob=1.0), tokenizer, bank=bank)
    reader.prepare_training(docs)
    qa = next(d for d in docs if d.startswith("Q:"))
    bio = next(d for d in docs if not d.startswith("Q:"))
    a = reader.train_batch([qa, bio], rng=random.Random(3))
    b = reader.train_batch([qa, bio], rng=random.Random(3))
    assert torch.equal(a.input_ids, b.input_ids)  # a function of the rng: a resumed run retraces
    text = tokenizer.decode(a.input_ids[0].tolist(), skip_special_tokens=False)
    (call,) = parse_calls(text)
    (orig,) = parse_calls(qa)
    assert call.entity != orig.entity and orig.entity not in text  # renamed everywhere
    assert call.value == "unknown" and text.replace("<|pad|>", "").endswith("unknown")
    assert call.entity in text.split("\n")[0]  # the question asks about the new name
    assert reader.lookup(call.entity, call.relation).how == "none"  # the bank really does not hold it
    plain = reader.train_batch([qa, bio], rng=random.Random(3), train=False)  # validation: no rewriting
    assert orig.entity in tokenizer.decode(plain.input_ids[0].tolist())
    assert tokenizer.decode(a.input_ids[1].tolist(), skip_special_tokens=False).startswith("<|bos|>" + bio)


def test_the_experiment_runner_picks_the_annotated_corpora():
    from memlm.experiment import _suffix
    from memlm.model.memory import get_memory_design

    assert get_memory_design("lmlm").annotation == "lmlm" and _suffix("lmlm") == "_lmlm"
    assert _suffix("rag") == ""


def test_plain_text_is_refused(bank, tokenizer):
    reader = load_reader(None, lmlm_model(), tokenizer, bank=bank)
    with pytest.raises(ConfigError, match="annotated with lookups"):
        reader.prepare_training(["Ada L. Byron was born in London."])


# ---- decoding --------------------------------------------------------------------------------------------


def person(bios, i=0):
    facts = lines(bios / "facts.jsonl")
    return facts[6 * i]["subject"], {f["relation"]: f["object"] for f in facts[6 * i : 6 * i + 6]}


def test_lookup_decode_equals_the_values_already_in_the_prompt(bios, bank, tokenizer):
    model = lmlm_model()
    name, facts = person(bios)
    gen = Generator(model, tokenizer, reader=load_reader(None, model, tokenizer, bank=bank),
                    hook_factory=script(tokenizer, {0: [(2, name, "birth_city"), (40, name, "employer")]}))  # fmt: skip
    prompt = f"Q: Tell me about {name}.\nA:"
    out = gen.generate([prompt], max_new_tokens=96)[0]
    toks = out.token_ids
    assert [e["value"] for e in out.trace] == [facts["birth_city"], facts["employer"]]
    ends = [i for i, t in enumerate(toks) if t == tokenizer.token_id(DB_END)]
    assert len(ends) == 2
    k = ends[-1] + 1  # everything up to the last <|db_end|> becomes prompt
    given = tokenizer.encode(prompt, bos=True) + toks[:k]
    assert f"{DB_RETURN} {facts['employer']}{DB_END}" in tokenizer.decode(given, skip_special_tokens=False)
    # no reader, no hook: nothing is looked up, the values are simply there
    rest = decode(model, [given], GenerationConfig(max_new_tokens=96 - k), pad_id=tokenizer.pad_id,
                  eos_id=tokenizer.eos_id).tokens[0]  # fmt: skip
    assert rest == toks[k:] and len(rest) > 3


def test_kv_cache_is_reused_every_token_fed_once_a_value_in_one_forward(bios, bank, tokenizer):
    model = CountingModel(lmlm_model())
    name, facts = person(bios)
    reader = load_reader(None, model.inner, tokenizer, bank=bank)
    gen = Generator(
        model, tokenizer, reader=reader, hook_factory=script(tokenizer, {0: [(1, name, "major")]})
    )
    prompt = f"Q: What did {name} study?\nA:"
    out = gen.generate([prompt], max_new_tokens=32)[0]
    assert out.trace and out.trace[0]["match"] == "exact"
    value = reader.value_ids(facts["major"])  # `` V<|db_end|>``, forced
    assert len(value) > 2
    widths = [w for _, w in model.widths]
    # prefill once; then every token goes in once (the cache holds the rest): the written call one token a
    # forward, the forced value with the token before it in one forward
    assert widths[0] == len(tokenizer.encode(prompt, bos=True))
    assert sum(widths[1:]) == len(out.token_ids) - 1
    assert len(model.widths) == len(out.token_ids) - len(value) + 1
    assert widths.count(len(value)) == 1 and widths.count(1) == len(widths) - 2
    quiet = gen.generate(["Hello"], max_new_tokens=1)[0]  # one step: no <|db_return|> to answer
    assert quiet.trace == [] and quiet.retrieved == []  # read nothing: a miss for QA, not "no provenance"


def test_batched_rows_pausing_at_different_steps_equal_one_row_at_a_time(bios, bank, tokenizer):
    model = lmlm_model()
    reader = load_reader(None, model, tokenizer, bank=bank)
    people = [person(bios, i)[0] for i in range(3)]
    prompts = [f"Q: Where does {people[0]} work?\nA:", f"Q: {people[1]}?\nA:", f"Tell me about {people[2]}:"]
    plan = {0: [(0, people[0], "employer_city")], 1: [(5, people[1], "birth_date"), (25, people[1], "major")],
            2: [(11, people[2], "university")]}  # fmt: skip
    batched = Generator(model, tokenizer, reader=reader, hook_factory=script(tokenizer, plan))
    together = batched.generate(prompts, max_new_tokens=90)
    for row, prompt in enumerate(prompts):
        alone = Generator(model, tokenizer, reader=reader, hook_factory=script(tokenizer, {0: plan[row]}))
        one = alone.generate([prompt], max_new_tokens=90)[0]
        assert one.token_ids == together[row].token_ids
        assert [e["value"] for e in one.trace] == [e["value"] for e in together[row].trace]
        assert [e["step"] for e in one.trace] == [e["step"] for e in together[row].trace]
        assert len(one.trace) == len(plan[row])
    assert len({e["step"] for o in together for e in o.trace}) >= 3  # the rows paused at different steps


def test_lookups_do_not_eat_the_answers_text_budget(bios, bank, tokenizer):
    """max_new_tokens counts answer text: a lookup's tokens get extra steps, a row without one gets none."""
    name, facts = person(bios)
    prompts = [f"Q: Which company employs {name}?\nA:", "Hello there"]
    outs = {}
    for steps in (0, 40):
        model = lmlm_model(lookup_steps=steps)
        reader = load_reader(None, model, tokenizer, bank=bank)
        assert reader.decode_steps(6) == 6 + steps
        gen = Generator(model, tokenizer, reader=reader, hook_factory=script(tokenizer, {0: [(0, name, "employer")]}))  # fmt: skip
        outs[steps] = gen.generate(prompts, max_new_tokens=6)
    cut, full = outs[0][0], outs[40][0]
    assert len(cut.token_ids) == 6 and DB_END not in cut.text  # the call ate the budget: its value is cut
    assert full.text.startswith(f"{DB_ENTITY} {name}{DB_RELATIONSHIP} employer{DB_RETURN} {facts['employer']}{DB_END}")  # fmt: skip
    for row in (full, outs[40][1]):  # both rows stop at 6 text tokens, whatever their lookups took
        assert row.finish_reason == "stop" or reader.text_tokens(row.token_ids) == 6
    assert len(full.token_ids) > 6 and outs[40][1].token_ids[:6] == outs[0][1].token_ids[:6]


def test_regenerating_from_scratch_gives_the_same_tokens(bios, bank, tokenizer):
    """The public code's way (stop, look up, regenerate from scratch) and memlm's cached decode agree."""
    model = lmlm_model()
    reader = load_reader(None, model, tokenizer, bank=bank)
    name, facts = person(bios, 1)
    prompt = tokenizer.encode(f"Q: Where was {name} born?\nA:", bos=True) + call_ids(
        tokenizer, name, "birth_city"
    )
    calls = {30: call_ids(tokenizer, name, "employer")}
    hook = reader.step_hook(PromptBatch(token_ids=[prompt]))
    then = scheduled_calls([calls])
    cached = decode(model, [prompt], GenerationConfig(max_new_tokens=80), pad_id=tokenizer.pad_id,
                    eos_id=tokenizer.eos_id, hook=lambda s: (hook(s), then(s)))  # fmt: skip
    text = tokenizer.decode(cached.tokens[0], skip_special_tokens=False)
    assert (
        text.startswith(f" {facts['birth_city']}{DB_END}")
        and f"{DB_RETURN} {facts['employer']}{DB_END}" in text
    )
    assert decode_regenerating(reader, prompt, 80, eos_id=tokenizer.eos_id, calls=calls) == cached.tokens[0]


# ---- lookups: unknown facts, namespaces, deletion, trace ----------------------------------------------


def test_unknown_facts_get_the_unknown_value_the_model_trained_on(bios, bank, tokenizer):
    model = lmlm_model()
    reader = load_reader(None, model, tokenizer, bank=bank)
    name, facts = person(bios)
    assert reader.lookup(name, "birth_city").value == facts["birth_city"]
    assert reader.lookup("Zanzibar Q. Nobody", "birth_city").value == "unknown"  # no such person
    assert reader.lookup(name, "shoe_size").how == "none"  # no such relation
    assert reader.parse_call(call_ids(tokenizer, name, "major")) == (name, "major", 0)
    assert reader.parse_call(tokenizer.encode(f"{DB_ENTITY} {name}{DB_RETURN}")) is None  # no relation
    assert reader.parse_call(tokenizer.encode(f"{DB_RELATIONSHIP} major{DB_RETURN}")) is None  # no entity
    gen = Generator(model, tokenizer, reader=reader)
    out = gen.generate([f"Q: {name}{DB_RELATIONSHIP} major{DB_RETURN}"], max_new_tokens=16)[0]
    assert out.trace[0]["match"] == "malformed" and out.text.startswith(" unknown" + DB_END)
    off = load_reader(None, lmlm_model(disabled=True), tokenizer, bank=bank)
    assert (off.lookup(name, "birth_city").value, off.lookup(name, "birth_city").how) == (
        "unknown",
        "disabled",
    )
    other = load_reader(None, lmlm_model(unknown="n/a"), tokenizer, bank=bank)
    assert other.lookup("Nobody", "major").value == "n/a"


def test_namespaces_scope_lookups(tokenizer, tmp_path):
    with MemoryBank.create(tmp_path / "b") as bank:
        bank.add(subject="Ada L. Byron", relation="birth_city", object="London", namespace="bios")
        bank.add(subject="Ada L. Byron", relation="employer", object="Secret Corp", namespace="private")
        bank.add(
            subject="France", relation="capital", object="Paris", namespace="geo", aliases=["French Republic"]
        )
        scoped = load_reader(None, lmlm_model(namespaces=["bios"]), tokenizer, bank=bank)
        every = load_reader(None, lmlm_model(), tokenizer, bank=bank)
        assert every.lookup("Ada L. Byron", "employer").value == "Secret Corp"
        assert every.lookup("french republic", "capital").value == "Paris"
        for subject, relation in [("Ada L. Byron", "employer"), ("Ada L Byron", "employer"),
                                  ("French Republic", "capital"), ("France", "capital"), ("Frnce", "capital")]:  # fmt: skip
            assert scoped.lookup(subject, relation).how == "none", (subject, relation)
        assert scoped.lookup("Ada L Byron", "birth_city").value == "London"  # fuzzy, inside the scope
        gen = Generator(every.model, tokenizer, reader=scoped)
        out = gen.generate(
            [f"Q: ?\nA:{DB_ENTITY} Ada L. Byron{DB_RELATIONSHIP} employer{DB_RETURN}"], max_new_tokens=6
        )[0]
        assert "Secret" not in out.text and out.trace[0]["entry_ids"] == [] and out.retrieved == []


def test_deleted_facts_leave_nothing_to_find(bios, bank, tokenizer):
    """Deleted through any spelling: exact, case, spacing, punctuation, typos, an alias; no cache keeps them."""
    reader = load_reader(None, lmlm_model(), tokenizer, bank=bank)
    facts = lines(bios / "facts.jsonl")
    victims = facts[0:48:7]  # several people and relations
    alias_of = {}
    for f in victims:  # give each victim's entry an alias too
        eid = bank.connection.execute("SELECT id FROM entries WHERE key=?", (f"{f['subject'].casefold()}\x1f{f['relation']}",)).fetchone()[0]  # fmt: skip
        alias_of[eid] = "Dr " + f["subject"].split()[-1]
        bank.update(eid, aliases=[alias_of[eid]])

    def spellings(name):
        first, mid, last = name.split()
        return [name, name.upper(), f"  {name.lower()} ", f"{first} {mid[0]} {last}", f"{first} {mid}{last}",
                f"{first} {mid} {last[:-1]}", f"{first} {mid} {last}e", f"{first}  {last}", f"{last}, {first} {mid}"]  # fmt: skip

    for f in victims:  # every spelling finds the fact before the deletion (builds the fuzzy index too)
        assert reader.lookup(f["subject"], f["relation"]).value == f["object"]
    found_before = sum(
        reader.lookup(s, f["relation"]).value == f["object"] for f in victims for s in spellings(f["subject"])
    )
    assert found_before >= len(victims) * 5  # fuzzy matching is really on: near-duplicates do resolve
    bank.delete(list(alias_of))
    for f, alias in zip(victims, alias_of.values()):
        for s in [*spellings(f["subject"]), alias, alias.lower()]:
            answer = reader.lookup(s, f["relation"])
            assert (
                answer.entry_id not in alias_of
                and answer.value != f["object"]
                or (
                    # another person who happens to share the value is not this fact
                    answer.entry_id is not None and bank.get(answer.entry_id).subject != f["subject"]
                )
            ), (s, f, answer)
            assert answer.entry_id not in alias_of
    # the person's other facts are still there, under every spelling that found them before
    f = victims[0]
    other = next(g for g in facts if g["subject"] == f["subject"] and g["relation"] != f["relation"])
    assert reader.lookup(f["subject"].upper(), other["relation"]).value == other["object"]


def test_context_entity_is_the_name_the_text_gives_and_deletions_stay_deleted(bios, bank, tokenizer):
    (name, facts), (other, theirs) = person(bios, 4), person(bios, 5)
    # no encoder: no fuzzy match to rescue a miscopied name, only the text
    reader = load_reader(None, lmlm_model(entity="context", encoder=None), tokenizer, bank=bank)
    written = load_reader(None, lmlm_model(encoder=None), tokenizer, bank=bank)
    wrong = "Zed " + name.split(maxsplit=1)[1]  # a miscopy of the name the question gives (first name)

    def ask(r, prompt, entity, relation="employer"):
        ids = tokenizer.encode(prompt, bos=True) + call_ids(tokenizer, entity, relation)
        return r.lookup(*r._read_call(ids))

    question = f"Q: Who employs {other}? And {name}?\nA:"
    assert ask(reader, question, wrong).value == facts["employer"]  # the named subject spelt most like it
    assert ask(written, question, wrong).value == "unknown"
    assert ask(reader, question, other).value == theirs["employer"]  # written and named: kept as written
    assert ask(reader, f"Q: Who employs {name}?\nA:", "Nobody At All").value == facts["employer"]
    assert (
        reader.named_entity(tokenizer.encode(f"Ask {name}."), wrong) == name
    )  # the full stop is not the name's
    assert ask(reader, f"Q: What is {name}'s employer?\nA:", wrong).value == facts["employer"]  # nor the 's
    assert ask(reader, "Q: Who employs him?\nA:", wrong).value == "unknown"  # nobody named: as written
    gen = Generator(reader.model, tokenizer, reader=reader)
    prompt = question + tokenizer.decode(call_ids(tokenizer, wrong, "employer"), skip_special_tokens=False)
    (event,) = gen.generate([prompt], max_new_tokens=4)[0].trace  # the trace keeps both names
    assert (event["entity"], event["looked_up"], event["value"]) == (wrong, name, facts["employer"])
    eid = ask(reader, question, wrong).entry_id
    bank.delete([eid])
    gone = ask(reader, question, wrong)
    assert gone.value == "unknown" and gone.entry_id is None  # the person's other entries do not answer


def test_a_relation_the_bank_knows_is_never_swapped_for_a_neighbour(tokenizer, tmp_path):
    with MemoryBank.create(tmp_path / "b") as bank:
        a = bank.add(subject="Ada L. Byron", relation="birth_city", object="London")
        bank.add(subject="Ada L. Byron", relation="birth_date", object="10 December 1815")
        bank.add(subject="Ada M. Byron", relation="birth_city", object="Paris")
        reader = load_reader(None, lmlm_model(threshold=0.3), tokenizer, bank=bank)
        assert reader.lookup("Ada L. Byron", "birth city").value == "London"  # a paraphrase: fuzzy
        bank.delete(a)
        assert reader.lookup("Ada L. Byron", "birth_city").how == "none"  # not her birth date
        assert reader.lookup("Ada L Byron", "birth_city").how == "none"  # not Ada M. Byron's city
        assert reader.lookup("Ada M. Byron", "birth_city").value == "Paris"


def test_trace_of_every_lookup_and_sources(bios, bank_dir, tokenizer, tmp_path, capsys):
    model = lmlm_model()
    name, facts = person(bios, 2)
    folder = tmp_path / "model"
    with MemoryBank.open(bank_dir) as bank:
        model.save_pretrained(folder, tokenizer=tokenizer, memory=memory_record("lmlm", bank))
    prompt = f"Q: Which university did {name} attend?\nA:" + tokenizer.decode(
        call_ids(tokenizer, name.lower(), "university"), skip_special_tokens=False)  # fmt: skip
    with Generator.from_pretrained(folder) as gen:
        out = gen.generate([prompt], max_new_tokens=12)[0]
        (event,) = out.trace
        entry = gen.reader.bank.get(event["entry_ids"][0])
    assert (entry.subject, entry.relation, entry.object) == (name, "university", facts["university"])
    assert event["kind"] == "lookup" and event["entity"] == name.lower() and event["relation"] == "university"
    assert event["looked_up"] == name.lower()
    assert event["match"] == "exact" and event["score"] == 1.0 and event["value"] == facts["university"]
    assert out.retrieved == [entry.id] and out.text.startswith(f" {facts['university']}{DB_END}")
    from memlm.cli import main

    assert (
        main(["generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "12", "--sources"])
        == 0
    )
    shown = capsys.readouterr().out
    assert (
        f"[{entry.id}] {entry.text}" in shown and "'kind': 'lookup'" in shown and "'match': 'exact'" in shown
    )


def test_save_load_round_trip_and_bank_edits_need_no_training(bios, bank_dir, tokenizer, tmp_path):
    import shutil

    model = lmlm_model()
    name, facts = person(bios, 3)
    shutil.copytree(bank_dir, tmp_path / "bank")
    folder = tmp_path / "model"
    with MemoryBank.open(tmp_path / "bank") as bank:
        model.save_pretrained(folder, tokenizer=tokenizer, memory=memory_record("lmlm", bank))
    prompt = f"Where does {name} work?" + tokenizer.decode(call_ids(tokenizer, name, "employer"), skip_special_tokens=False)  # fmt: skip
    direct = Generator(model, tokenizer, reader=load_reader(None, model, tokenizer, bank=tmp_path / "bank"))
    want = direct.generate([prompt], max_new_tokens=16)[0]
    direct.close()
    with Generator.from_pretrained(folder) as gen:
        got = gen.generate([prompt], max_new_tokens=16)[0]
        assert got.token_ids == want.token_ids and got.trace == want.trace
        assert gen.reader.options.encoder == OPTIONS["encoder"]  # the options travel with the checkpoint
        eid = got.retrieved[0]
        nobody = tokenizer.decode(call_ids(tokenizer, "Nobody At All", "employer"), skip_special_tokens=False)
        gen.generate([nobody], max_new_tokens=2)  # the fuzzy index, built in a decode (inference mode) ...
        gen.reader.bank.update(eid, object="Atlantis Labs")  # the next query reads the new value
        assert gen.reader.refresh() == 1  # ... follows the edit outside it (as `memlm eval edit` calls it)
        edited = gen.generate([prompt], max_new_tokens=16)[0]
    assert edited.trace[0]["value"] == "Atlantis Labs" and edited.text.startswith(" Atlantis Labs" + DB_END)
    assert facts["employer"] != "Atlantis Labs"


@pytest.mark.slow
def test_a_training_step_on_cpu(bios, bank_dir, tmp_path):
    from memlm.cli import main

    out = tmp_path / "run"
    args = [
        "train", "--model.vocab_size", "400", "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32",
        "--model.block_size", "512", "--model.memory", "lmlm",
        "--model.memory_options", '{"encoder": null, "unknown_prob": 0.2}',
        "--data.train", str(bios / "corpus/train_lmlm.jsonl"), "--data.bank", str(bank_dir),
        "--data.val_fraction", "0.1", "--train.batch_size", "4", "--train.max_steps", "3", "--train.warmup_steps", "1",
        "--train.eval_every", "3", "--train.eval_batches", "1", "--train.save_every", "3", "--train.log_every", "1",
        "--train.progress", "false", "--out_dir", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert any(r["kind"] == "eval" and r["val_loss"] > 0 for r in rows)
    assert json.loads((out / "memory.json").read_text())["design"] == "lmlm"


# ---- the context resolver: which bank relation the sentence of a call asks for --------------------------


def test_call_sentence_is_the_clause_the_call_was_written_in(bios, bank, tokenizer):
    reader = load_reader(None, lmlm_model(relation="context"), tokenizer, bank=bank)
    name, facts = person(bios)
    q = tokenizer.encode(f"Q: Where was {name} born?\nA:")
    assert reader.call_sentence(q, name) == "Q: Where was someone born? A:"
    bio = f"{name} was born on{call_ids_text(name, 'birth_date', facts['birth_date'])} 1 May 1990. {name} hails from"
    assert reader.call_sentence(tokenizer.encode(bio), name) == "someone hails from"
    full = tokenizer.encode(bio) + call_ids(tokenizer, name, "birth_city")
    assert reader._read_call(full) == (name, "birth_city", "someone hails from")


def call_ids_text(entity, relation, value):
    return f"{DB_ENTITY} {entity}{DB_RELATIONSHIP} {relation}{DB_RETURN} {value}{DB_END}"


@pytest.fixture
def geo(tmp_path):
    with MemoryBank.create(tmp_path / "geo") as bank:
        bank.add(
            subject="France", relation="capital", object="Paris", text="The capital city of France is Paris."
        )
        bank.add(
            subject="France", relation="currency", object="Euro", text="People in France pay with the Euro."
        )
        bank.add(subject="Peru", relation="capital", object="Lima", text="The capital city of Peru is Lima.")
        bank.add(subject="Peru", relation="currency", object="Sol", text="People in Peru pay with the Sol.")
        bank.add(subject="Mars", relation="moons", object="2", text="Mars has 2 moons.", namespace="space")
        yield bank


def test_the_sentence_decides_the_relation_and_the_written_one_is_evidence(tokenizer, geo):
    ctx = load_reader(None, lmlm_model(relation="context", written_weight=0.1), tokenizer, bank=geo)
    written = load_reader(None, lmlm_model(), tokenizer, bank=geo)
    ask = "Q: Which city is the capital city of someone? A:"
    assert written.lookup("Peru", "currency", ask).value == "Sol"  # the model's relation, as written
    answer = ctx.lookup("Peru", "currency", ask)  # the sentence outweighs a wrong written relation
    assert (answer.value, answer.relation, answer.how) == ("Lima", "capital", "exact")
    assert ctx.lookup("Peru", "currency", "Q: What do people in someone pay with? A:").value == "Sol"
    assert ctx.lookup("Peru", "money", "Q: What do people in someone pay with? A:").value == "Sol"
    stubborn = load_reader(None, lmlm_model(relation="context", written_weight=5.0), tokenizer, bank=geo)
    assert (
        stubborn.lookup("Peru", "currency", ask).value == "Sol"
    )  # a heavy written weight: the model decides
    assert ctx.lookup("Peru", "capital", None).value == "Lima"  # no sentence: the written relation
    # a relation of another namespace is no candidate; one that no entry uses any more neither
    scoped = load_reader(None, lmlm_model(relation="context", namespaces=["default"]), tokenizer, bank=geo)
    assert scoped.relations.resolve(["How many moons has someone?"], ["moons"], ["default"])[0][0] != "moons"
    assert ctx.relations.resolve(["How many moons has someone?"], ["moons"])[0][0] == "moons"
    peru = ctx.lookup("Peru", "capital", ask).entry_id
    geo.delete([peru])  # Peru's capital is gone: unknown, never Peru's currency or France's capital
    gone = ctx.lookup("Peru", "currency", ask)
    assert (gone.value, gone.relation) == ("unknown", "capital")
    geo.delete([e.id for e in geo if e.relation == "capital"])
    assert ctx.relations.resolve([ask], ["capital"])[0][0] != "capital"


def test_context_lookups_run_in_the_decode_and_show_in_the_trace(bios, bank, tokenizer):
    model = lmlm_model(relation="context", written_weight=0.0)
    reader = load_reader(None, model, tokenizer, bank=bank)
    name, facts = person(bios, 4)
    gen = Generator(model, tokenizer, reader=reader,
                    hook_factory=script(tokenizer, {0: [(0, name, "employer")], 1: [(3, name, "major")]}))  # fmt: skip
    outs = gen.generate(
        [f"Q: {name} studied at which university?\nA:", f"Q: Who employs {name}?\nA:"], max_new_tokens=60
    )
    for out in outs:
        (event,) = out.trace
        assert event["relation"] in ("employer", "major") and event["asked"] in facts
        assert event["value"] == facts[event["asked"]]


@pytest.mark.slow
def test_minilm_maps_phrasings_the_model_never_saw_to_the_bank_relation(bank, tokenizer):
    reader = load_reader(
        None, lmlm_model(relation="context", encoder="minilm", threshold=0.8), tokenizer, bank=bank
    )
    asks = {"birth_city": "Q: What is the hometown of someone? A:", "birth_date": "Q: What is the date of birth "
            "of someone? A:", "university": "Q: What is the alma mater of someone? A:",
            "employer_city": "Q: In which city does someone work? A:"}  # fmt: skip
    got = reader.relations.resolve(list(asks.values()), ["major"] * len(asks))
    assert [r for r, _ in got] == list(asks)


def test_the_bank_size_timing_sets_up_the_fuzzy_index_before_it_starts(bios, bank, tokenizer, monkeypatch):
    """The experiment's seconds per question time the questions: the fuzzy index of subject names, which LMLM's
    first inexact lookup builds (minutes at a million entries), is set up before."""
    from memlm import experiment
    from memlm.eval.qa import load_qa

    model = lmlm_model()
    gen = Generator(model, tokenizer, reader=load_reader(None, model, tokenizer, bank=bank))
    ask, built = experiment._ask, []
    monkeypatch.setattr(
        experiment, "_ask", lambda g, r, n: built.append(g.reader.index._fuzzy is not None) or ask(g, r, n)
    )
    report, setup, seconds = experiment._timed_ask(gen, load_qa(bios, "unseen")[:2], 2)
    assert built == [True] and report.n == 2 and setup > 0 and seconds > 0
