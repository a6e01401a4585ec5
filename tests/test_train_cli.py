"""``memlm train``: help, overrides through argparse, a run that trains its own tokenizer, resume."""

import json

import pytest

from memlm.cli import main

DOCS = [f"Person {i} lives in town {i % 9} and likes number {i % 4}." for i in range(60)]


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0 and "--train.lr" in capsys.readouterr().out


def test_unknown_override_is_a_one_line_error(capsys):
    assert main(["train", "--print-config", "--train.lrr", "1"]) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err


def test_shipped_tiny_config_loads_and_says_how_to_run():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert (
        path.read_text().startswith("# Run: ")
        and "memlm train --config configs/tiny.yaml" in path.read_text()
    )
    assert main(["train", "--config", str(path), "--print-config"]) == 0


def test_train_run_and_resume(tmp_path, capsys):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    args = [
        "train", "--model.vocab_size", "280", "--model.n_layer", "1", "--model.n_head", "2",
        "--model.n_embd", "32", "--model.block_size", "16", "--data.train", str(corpus),
        "--data.seq_len", "16", "--train.batch_size", "2", "--train.max_steps", "3", "--train.save_every", "2",
        "--train.warmup_steps", "1", "--train.progress", "false", "--out_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(args) == 0
    assert "model in" in capsys.readouterr().out
    run = tmp_path / "run"
    assert (run / "tokenizer" / "tokenizer.json").is_file()  # trained on data.train
    assert {p.name for p in (run / "final").iterdir()} >= {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
    }
    assert main(args) == 2  # existing checkpoints, no --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # already at max_steps: nothing to redo
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3]  # log_every=10: only the last step is logged

    from memlm.model.gpt import GPT

    model = GPT.from_pretrained(run / "final")
    assert model.config.n_layer == 1


def test_refused_config_leaves_no_run_folder(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "run"
    cfg.write_text(f"out_dir: {out}\ntrain: {{max_steps: 2}}\n")
    assert main(["train", "--config", str(cfg), "--train.lr", "-3e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(cfg) in err and "train.lr must be > 0" in err
    assert not out.exists()
