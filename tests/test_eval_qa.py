"""QA evaluation API with fake generators: an oracle, a wrong answerer, and a retriever."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from memlm.data.annotate import call_string
from memlm.data.bios import BiosConfig, generate_bios
from memlm.errors import InputError
from memlm.eval.qa import evaluate_qa, exact_match, load_qa, normalize_answer, write_report


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
