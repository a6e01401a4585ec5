"""The console script: every command has help, and errors are one clear line with exit code 2."""

import json
import subprocess
import sys

import pytest

from memlm.cli import build_parser, main
from memlm.model import GPT, ModelConfig
from memlm.tokenizer import Tokenizer


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "memlm", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("train", "generate", "data", "eval", "bank"):
        assert command in out.stdout


def test_every_subcommand_has_help(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert len(sub.choices) >= 5
    for name in sub.choices:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: memlm " + name in capsys.readouterr().out


@pytest.fixture
def model_dir(tmp_path):
    tok = Tokenizer.train(["hello world, hello memory"] * 10, vocab_size=300)
    model = GPT(
        ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=64, init_std=0.3)
    )
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    return tmp_path / "m"


def test_generate_command(model_dir, capsys):
    assert (
        main(["generate", "--model", str(model_dir), "--prompt", "hello", "--prompt", "wor", "--json"]) == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "wor"]
    assert all(len(r["token_ids"]) > 0 for r in rows)
    assert (
        main(
            ["generate", "--model", str(model_dir), "--prompt", "hello", "--stream", "--max-new-tokens", "4"]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("hello")


def test_generate_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "Traceback" not in err and err.count("\n") == 1


def test_generate_reads_prompts_from_jsonl(model_dir, tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"prompt": "hello"}\n{"prompt": "wor"}\n{"prompt": "third"}\n')
    assert (
        main(["generate", "--model", str(model_dir), "--prompts-file", str(qa), "--limit", "2", "--json"])
        == 0
    )
    assert [json.loads(r)["prompt"] for r in capsys.readouterr().out.splitlines()] == ["hello", "wor"]
    qa.write_text('{"prompt": "hello"}\n{"question": "no prompt"}\n')
    assert main(["generate", "--model", str(model_dir), "--prompts-file", str(qa)]) == 2
    assert f"{qa}:2: field 'prompt'" in capsys.readouterr().err


def test_bench_rejects_unknown_parts_and_bad_sizes(tmp_path, capsys):
    assert main(["bench", "--parts", "designs,nope", "--out", str(tmp_path / "b")]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
    assert main(["bench", "--bank-sizes", "10k", "--out", str(tmp_path / "b")]) == 2
    assert "--bank-sizes" in capsys.readouterr().err
