"""`memlm data bios|geo|ingest` and `memlm eval qa` from the command line."""

import json

import pytest

from memlm.cli import main
from memlm.eval.qa import load_qa


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    assert "bios" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "qa", "--help"])
    assert "--split" in capsys.readouterr().out


def test_data_bios_and_eval_qa_with_a_fake_model(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bios"
    assert main(["data", "bios", "--people", "50", "--seed", "1", "--out", str(out), "--low-data", "10"]) == 0
    assert (out / "corpus/train.jsonl").exists() and (out / "corpus/low_10.jsonl").exists()
    assert not (out / "corpus/low_1.jsonl").exists()
    answers = {
        json.loads(x)["prompt"]: json.loads(x)["answer"]
        for x in (out / "qa/unseen.jsonl").read_text().splitlines()
    }

    class Fake:
        def generate(self, prompts, *, max_new_tokens):
            # Right for the first half of the questions only.
            return [
                " " + answers.get(p, "") if i < len(prompts) // 2 else " wrong" for i, p in enumerate(prompts)
            ]

    import memlm.generate

    seen = {}

    def from_pretrained(directory, device="cpu", bank=None, memory_options=None):
        seen["dir"], seen["bank"] = directory, bank
        return Fake()

    monkeypatch.setattr(memlm.generate.Generator, "from_pretrained", staticmethod(from_pretrained))
    model = tmp_path / "model"
    rc = main(
        ["eval", "qa", "--model", str(model), "--data", str(out), "--split", "unseen", "--batch-size", "1000"]
    )
    assert rc == 0 and seen["dir"] == str(model)
    report = json.loads((model / "eval/qa_unseen.json").read_text())
    assert report["n"] == len(answers) and report["em"] == pytest.approx((len(answers) // 2) / len(answers))
    assert "| **all** |" in capsys.readouterr().out

    # --sample: a seeded random sample (the same each time), not the file's first questions
    args = ["eval", "qa", "--model", str(model), "--data", str(out), "--split", "unseen", "--sample", "5"]
    asked = []
    for _ in range(2):
        assert main([*args, "--out", str(tmp_path / "s")]) == 0
        lines = asked_lines = (tmp_path / "s" / "qa_unseen_predictions.jsonl").read_text().splitlines()
        asked.append([json.loads(line)["prompt"] for line in lines])
    first = [r.prompt for r in load_qa(out, "unseen")[:5]]
    assert len(asked[0]) == 5 and asked[0] == asked[1] and asked[0] != first

    # --phrasing train: the same sample in the corpus's question phrasing, written apart
    assert main([*args, "--out", str(tmp_path / "s"), "--phrasing", "train"]) == 0
    lines = (tmp_path / "s" / "qa_unseen_train_predictions.jsonl").read_text().splitlines()
    rephrased = [json.loads(line) for line in lines]
    assert [p["fact_id"] for p in rephrased] == [json.loads(x)["fact_id"] for x in asked_lines]
    assert not {p["prompt"] for p in rephrased} & set(asked[0])
    assert json.loads((tmp_path / "s" / "qa_unseen_train.json").read_text())["phrasing"] == "train"
    # --phrasing FILE: templates of one's own, written under the file's name
    mine = tmp_path / "novel.json"
    relations = {p["relation"] for p in rephrased}
    mine.write_text(json.dumps({rel: ["Pray tell, {s}: " + rel + "?"] for rel in relations}))
    assert main([*args, "--out", str(tmp_path / "s"), "--phrasing", str(mine)]) == 0
    lines = (tmp_path / "s" / "qa_unseen_novel_predictions.jsonl").read_text().splitlines()
    novel = [json.loads(line) for line in lines]
    assert [p["fact_id"] for p in novel] == [p["fact_id"] for p in rephrased]
    assert all(
        p["prompt"] == f"Q: Pray tell, {p['prompt'][14:].split(':')[0]}: {p['relation']}?\nA:" for p in novel
    )


def test_ingest_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"subject": "a", "relation": "b"}\n')
    assert main(["data", "ingest", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1:" in err and "'object'" in err and not (tmp_path / "o").exists()


def test_bad_options_are_user_errors(tmp_path, capsys):
    assert main(["data", "bios", "--people", "0", "--out", str(tmp_path / "x")]) == 2
    assert main(["data", "bios", "--edit-share", "2", "--out", str(tmp_path / "x")]) == 2
    assert main(["eval", "qa", "--model", "m", "--data", str(tmp_path), "--split", "seen"]) == 2
    assert not (tmp_path / "x").exists()
