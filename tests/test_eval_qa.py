"""QA evaluation API with fake generators: an oracle, a wrong answerer, and a retriever."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from memlm.data.annotate import call_string
from memlm.data.bios import TEMPLATES, BiosConfig, generate_bios
from memlm.errors import InputError
from memlm.eval.qa import evaluate_qa, exact_match, load_qa, normalize_answer, rephrase, write_report


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bios") / "b"
    generate_bios(out, BiosConfig(people=100, seed=0))
    return out


def _answers(data_dir):
    return {
        json.loads(x)["prompt"]: json.loads(x)["answer"]
        for s in ("seen", "unseen")
        for x in (data_dir / f"qa/{s}.jsonl").read_text().splitlines()
    }


class Oracle:
    """Answers from the data, in the format a trained model produces (leading space, then more lines)."""

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def generate(self, prompts, *, max_new_tokens):
        self.calls += 1
        return [" " + self.answers[p] + "\nQ: something else" for p in prompts]


class Wrong:
    def generate(self, prompts, *, max_new_tokens):
        return [" Atlantis" for _ in prompts]


@dataclass
class Gen:
    text: str
    retrieved: list[int] | None


class Retriever:
    """Retrieves the gold fact for even fact ids only, and answers right only when it retrieved it."""

    def __init__(self, records):
        self.by_prompt = {r.prompt: r for r in records}

    def generate(self, prompts, *, max_new_tokens):
        out = []
        for p in prompts:
            r = self.by_prompt[p]
            if r.fact_id % 2 == 0:
                call = call_string(r.subject, r.relation, r.answer)
                out.append(Gen(call + " " + r.answer, [r.fact_id + 10_000, r.fact_id]))
            else:
                out.append(Gen(" no idea", [r.fact_id + 1]))
        return out


def test_normalisation():
    assert normalize_answer("  The  University of Ashford. ") == "university of ashford"
    assert exact_match(" Paris\nQ: next", "Paris")
    assert not exact_match(" Paris Texas", "Paris")
    assert exact_match(call_string("A", "birth_city", "Paris") + " Paris", "paris")
    assert exact_match(" Ｚürich", "Zürich")  # NFKC: full-width letters fold


def test_oracle_scores_one_and_wrong_scores_zero(data_dir):
    records = load_qa(data_dir, "all")
    assert len(records) == 600 and {r.split for r in records} == {"seen", "unseen"}
    oracle = Oracle(_answers(data_dir))
    report = evaluate_qa(oracle, records, batch_size=64)
    assert oracle.calls == 10  # batched
    assert report.em == 1.0 and report.n == 600 and report.retrieval is None
    assert set(report.per_relation) == {
        "birth_date",
        "birth_city",
        "university",
        "major",
        "employer",
        "employer_city",
    }
    assert report.per_split["seen"]["n"] == 300
    wrong = evaluate_qa(Wrong(), records)
    assert wrong.em == 0.0 and all(v["em"] == 0.0 for v in wrong.per_relation.values())


def test_retrieval_hit_rate_and_conditional_accuracy(data_dir):
    records = load_qa(data_dir, "unseen")
    report = evaluate_qa(Retriever(records), records)
    even = sum(r.fact_id % 2 == 0 for r in records)
    assert report.retrieval["n"] == len(records)
    assert report.retrieval["hit_rate"] == pytest.approx(even / len(records))
    assert report.retrieval["em_given_hit"] == 1.0 and report.retrieval["em_given_miss"] == 0.0
    # A mapping that shifts entry ids turns every hit into a miss.
    shifted = evaluate_qa(Retriever(records), records, fact_to_entry_id=lambda r: r.fact_id + 7)
    assert shifted.retrieval["hit_rate"] == 0.0


def test_report_files(data_dir, tmp_path):
    records = load_qa(data_dir, "seen")
    report = evaluate_qa(Oracle(_answers(data_dir)), records)
    path = write_report(report, tmp_path, "qa_seen", meta={"model": "oracle"})
    summary = json.loads(path.read_text())
    assert summary["em"] == 1.0 and summary["model"] == "oracle" and "predictions" not in summary
    assert "| **all** | 300 | 1.000 |" in (tmp_path / "qa_seen.md").read_text()
    assert len((tmp_path / "qa_seen_predictions.jsonl").read_text().splitlines()) == 300


def test_bad_qa_file_names_line_and_field(tmp_path):
    (tmp_path / "qa").mkdir()
    good = {
        "prompt": "Q: x?\nA:",
        "answer": "y",
        "subject": "s",
        "relation": "r",
        "fact_id": 0,
        "split": "seen",
    }
    bad = dict(good, fact_id="zero")
    (tmp_path / "qa/seen.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(InputError) as err:
        load_qa(tmp_path, "seen")
    assert err.value.line == 2 and err.value.field == "fact_id"
    with pytest.raises(InputError):
        load_qa(tmp_path, "unseen")
    (tmp_path / "qa/seen.jsonl").write_text(json.dumps(dict(good, template="first")) + "\n")
    with pytest.raises(InputError) as err:
        load_qa(tmp_path, "seen")
    assert err.value.line == 1 and err.value.field == "template"


def _templated(record) -> str:
    """The question of a prompt with its subject put back as ``{s}``: which template phrased it."""
    return record.prompt.removeprefix("Q: ").removesuffix("\nA:").replace(record.subject, "{s}")


def test_rephrase_asks_the_same_questions_in_the_corpus_phrasing(data_dir):
    records = load_qa(data_dir, "unseen")
    assert {r.template for r in records} == {0, 1}
    # eval phrasing renders the QA files' own prompts; train phrasing only templates the corpus drills
    assert [r.prompt for r in rephrase(records, data_dir, "eval")] == [r.prompt for r in records]
    train = rephrase(records, data_dir, "train")
    assert [(r.fact_id, r.answer, r.subject) for r in train] == [
        (r.fact_id, r.answer, r.subject) for r in records
    ]
    for r in train:
        assert _templated(r) in TEMPLATES.train_questions[r.relation]
        assert _templated(r) not in TEMPLATES.eval_questions[r.relation]
    assert {(r.relation, _templated(r)) for r in train} == {
        (rel, t) for rel, ts in TEMPLATES.train_questions.items() for t in ts
    }
    corpus = (data_dir / "corpus/train.jsonl").read_text()
    assert any(
        json.dumps(r.prompt)[1:-1] in corpus for r in rephrase(load_qa(data_dir, "seen"), data_dir, "train")
    )
    with pytest.raises(InputError) as err:
        rephrase(records, data_dir / "qa", "train")  # a folder without meta.json
    assert err.value.field == "templates.train_questions" and "meta.json" in str(err.value)
    with pytest.raises(InputError) as err:
        rephrase(records, data_dir, "other")  # neither eval, train nor a file
    assert "other" in str(err.value)


def test_rephrase_with_templates_of_ones_own(data_dir, tmp_path):
    """A JSON file of templates phrases the same questions in words neither the repository nor the corpus has."""
    records = load_qa(data_dir, "unseen")
    mine = {
        rel: [f"Tell me, for {{s}}, the {rel} ({i})?" for i in range(3)] for rel in TEMPLATES.eval_questions
    }
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(mine))
    asked = rephrase(records, data_dir, str(path))
    assert [(r.fact_id, r.answer, r.template) for r in asked] == [
        (r.fact_id, r.answer, r.template % 3) for r in records
    ]
    assert all(
        r.prompt == f"Q: Tell me, for {r.subject}, the {r.relation} ({r.template})?\nA:" for r in asked
    )
    for bad, field in (
        ({**mine, "major": ["What did they study?"]}, "major"),  # no {s}: whose question?
        (["Who employs {s}?"], "templates"),
        ({k: v for k, v in mine.items() if k != "employer"}, "templates"),  # a relation asked has none
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(InputError) as err:
            rephrase(records, data_dir, str(path))
        assert err.value.field == field and "mine.json" in str(err.value)


def test_per_phrasing_scores_each_template_apart(data_dir):
    records = load_qa(data_dir, "unseen")
    by_prompt = {r.prompt: r for r in records}

    class FirstTemplateOnly:
        def generate(self, prompts, *, max_new_tokens):
            return [
                Gen(" " + by_prompt[p].answer if by_prompt[p].template == 0 else " no", [0]) for p in prompts
            ]

    report = evaluate_qa(FirstTemplateOnly(), records)
    assert set(report.per_phrasing) == {f"{rel}/{t}" for rel in TEMPLATES.eval_questions for t in (0, 1)}
    assert sum(v["n"] for v in report.per_phrasing.values()) == len(records)
    for key, v in report.per_phrasing.items():
        assert v["em"] == (1.0 if key.endswith("/0") else 0.0) and "hit_rate" in v
    assert 0 < report.em < 1
