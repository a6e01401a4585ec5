"""``memlm demo``: the memory story end to end on a small bios benchmark, in minutes on 2 CPU cores.

1. Data, a bank of everyone's facts, and two models trained on the same text about the *seen* half of the
   people with the same budget: dense (facts in its weights) and a memory model (facts read from the bank).
   These are :class:`~memlm.experiment.Experiment` cells: a second ``memlm demo`` reuses what the first one
   trained, a killed one goes on where it stopped.
2. Questions about people the models never saw in training (held-out question phrasings), each answer with
   the bank entries it used.
3. One fact edited in a copy of the bank: the answer changes, with no training step.
4. One fact deleted: the old answer is gone.
5. The comparison table (dense vs memory: seen, unseen, edited, deleted), from the experiment's evaluation.

Everything goes to one run directory (``out_dir``), printed at the end.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memlm.experiment import MAIN, BenchmarkSpec, Experiment, ExperimentConfig
from memlm.tokenizer import DB_END

# What each design reads with in the demo: its shipped config's options (configs/<design>.yaml).
# LMLM (the default): lookups resolved from the call's sentence and the names the text gives, so phrasings
# the model never saw still reach the right entry. RAG: the recipe of docs/results.md.
DEMO_OPTIONS: dict[str, dict[str, Any]] = {
    "lmlm": {
        "encoder": "minilm",
        "threshold": 0.8,
        "unknown_prob": 0.1,
        "relation": "context",
        "entity": "context",
    },
    "rag": {"k": 1, "key": "about", "swap_prob": 0.5, "train_pick": 4, "query_noise": 0.6},
}


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    people: int = 400  # bios entities; the training text covers half of them
    design: str = "lmlm"  # the memory model shown beside dense
    design_options: dict[str, Any] | None = None  # None: DEMO_OPTIONS[design] (or the design's defaults)
    steps: int = 1000  # training steps per model
    batch_size: int = 16
    block_size: int = 160
    questions: int = 100  # evaluated per split (seeded sample)
    show: int = 4  # unseen-people questions printed with their sources
    seed: int = 0
    model: dict[str, Any] = field(
        default_factory=lambda: {"vocab_size": 2048, "n_layer": 4, "n_head": 4, "n_embd": 128}
    )
    encoder: str = "minilm"  # the bank's encoder
    # Train dense and the memory model at once, one process and one thread each (on 2 cores: half the time).
    parallel: bool = True

    def options(self) -> dict[str, Any]:
        if self.design_options is not None:
            return self.design_options
        return dict(DEMO_OPTIONS.get(self.design, {}))

    def experiment(self) -> ExperimentConfig:
        return ExperimentConfig(
            out_dir=self.out_dir,
            benchmarks=[BenchmarkSpec(name="bios", people=self.people, seed=self.seed)],
            designs=["none", self.design],
            design_options={self.design: self.options()},
            model={**self.model, "block_size": self.block_size},
            train={
                "lr": 3e-3,
                "warmup_steps": min(100, self.steps // 10),
                "max_steps": self.steps,
                "batch_size": self.batch_size,
                "weight_decay": 0.1,
                "eval_every": self.steps,
                "eval_batches": 4,
                "save_every": max(self.steps // 4, 1),
                "keep_last": 1,
                "log_every": 50,
                "seed": 1337,
            },
            low_data=[],
            bank_sizes=[],
            eval_questions=self.questions,
            decode_prompts=16,
            encoder=self.encoder,
            workers=2 if self.parallel else 1,
        )


def run_demo(cfg: DemoConfig, *, out=print, progress: bool = True) -> dict:
    """Train (or reuse), evaluate, then show answers with sources, an edit and a deletion. Returns the
    experiment's results plus ``showcase`` (what was printed, as data)."""
    exp = Experiment(cfg.experiment(), progress=progress)
    bench = exp.config.benchmarks[0]
    data, bank = exp.data(bench), exp.bank(bench)
    results = exp.run()  # trains what is not trained yet, evaluates, writes results.json and the report
    model, dense = _final(exp, bench, cfg.design), _final(exp, bench, "none")
    results["showcase"] = showcase(model, dense, data, bank, exp.root / "showcase", cfg, out=out)
    cells = results["benchmarks"][bench.name]
    out("\n== dense vs memory (same text, same budget; held-out question phrasings) ==")
    out(comparison_table(cells.get("none", {}).get(MAIN, {}), cells.get(cfg.design, {}).get(MAIN, {}), cfg))
    out(f"\neverything is in {exp.root}/ (results.json, report.md, plots/, runs/, showcase/)")
    return results


def _final(exp: Experiment, bench: BenchmarkSpec, design: str) -> Path:
    return exp.root / "runs" / bench.name / design / MAIN / "final"


def showcase(model: Path, dense: Path, data: Path, bank: Path, out_dir: Path, cfg: DemoConfig, *, out=print):
    from memlm.eval.qa import exact_match, load_qa
    from memlm.eval.update import bank_copy, entry_ids_by_key
    from memlm.generate import Generator
    from memlm.utils.jsonl import iter_jsonl

    def ask(gen, records):
        return gen.generate([r.prompt for r in records], max_new_tokens=16, stop=["\n"])

    def show(gen, records, gens, title):
        out(f"\n== {title} ==")
        for r, g in zip(records, gens):
            mark = "right" if exact_match(g.text, r.answer) else f"wrong, the bank says {r.answer!r}"
            out(f"{_line(r.prompt)} {_answer(g.text)}   ({mark})")
            if _answer(g.text) != g.text.strip():
                out(f"    wrote {g.text.strip()!r}")  # the lookup the model wrote and the value it got back
            entries = gen.reader.bank.get_many(g.retrieved or [], missing_ok=True)
            for i, e in zip(g.retrieved or [], entries):
                out(f"    used [{i}] {e.text if e is not None else '(deleted since)'}")

    shown: dict[str, Any] = {}
    unseen = random.Random(cfg.seed).sample(load_qa(data, "unseen"), cfg.show)
    with Generator.from_pretrained(dense) as gen:
        gens = ask(gen, unseen)
        out("\n== the dense model, asked about people it never saw (it can only guess) ==")
        for r, g in zip(unseen, gens):
            out(f"{_line(r.prompt)} {_answer(g.text)}   (the bank says {r.answer!r})")
    if out_dir.exists():
        shutil.rmtree(out_dir)  # the showcase edits a fresh copy each run; the original bank is never written
    with bank_copy(bank, keep=out_dir / "bank") as copy, Generator.from_pretrained(model, bank=copy) as gen:
        gens = ask(gen, unseen)
        show(gen, unseen, gens, f"the {cfg.design} model on the same questions, with the entries it used")
        shown["unseen"] = [_row(r, g) for r, g in zip(unseen, gens)]

        # Edit: the first edited fact this model answers right before the edit (else the first one).
        edits = {e["fact_id"]: e for _, e in iter_jsonl(data / "edits.jsonl")}
        edited = [r for r in load_qa(data, "edited") if r.fact_id in edits][:20]
        before = ask(gen, edited)
        j = next((i for i, (r, g) in enumerate(zip(edited, before)) if exact_match(g.text, r.answer)), 0)
        q, e = edited[j], edits[edited[j].fact_id]
        (eid,) = entry_ids_by_key(copy, [e])
        t0 = time.perf_counter()
        copy.update(eid, object=e["object"], text=e["text"])
        (after,) = ask(gen, [q])  # the reader re-encodes and re-indexes the changed entry on this query
        seconds = time.perf_counter() - t0
        out(f"\n== edit: [{eid}] {e['old_object']!r} -> {e['object']!r} in the bank copy; no training ==")
        out(f"before: {_line(q.prompt)} {_answer(before[j].text)}")
        out(f"after:  {_line(q.prompt)} {_answer(after.text)}   (edit to answer: {seconds:.2f} s)")
        shown["edit"] = {"entry": eid, "old": e["old_object"], "new": e["object"], "seconds": seconds,
                         "before": before[j].text.strip(), "after": after.text.strip()}  # fmt: skip

        # Delete: an unseen person's fact the model answered right above (else the first question's).
        k = next((i for i, (r, g) in enumerate(zip(unseen, gens)) if exact_match(g.text, r.answer)), 0)
        q = unseen[k]
        (did,) = entry_ids_by_key(copy, [{"subject": q.subject, "relation": q.relation}])
        text = copy.get(did).text
        copy.delete([did])
        (after,) = ask(gen, [q])
        out(f"\n== delete: [{did}] {text!r} from the bank copy ==")
        out(f"before: {_line(q.prompt)} {_answer(gens[k].text)}")
        out(f"after:  {_line(q.prompt)} {_answer(after.text)}   (now reads {after.retrieved})")
        shown["delete"] = {"entry": did, "before": gens[k].text.strip(), "after": after.text.strip(),
                           "old_answer_still_given": exact_match(after.text, q.answer)}  # fmt: skip
    return shown


def comparison_table(dense: dict, memory: dict, cfg: DemoConfig) -> str:
    def em(cell, split):
        return cell.get(f"qa_{split}", {}).get("em")

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    rows = [
        ("EM, seen people", pct(em(dense, "seen")), pct(em(memory, "seen"))),
        ("EM, unseen people", pct(em(dense, "unseen")), pct(em(memory, "unseen"))),
        ("edited facts answered with the new value", "-", pct(memory.get("edit", {}).get("new_value_rate"))),
        ("other answers unchanged by the edits", "-", pct(memory.get("edit", {}).get("others_unchanged"))),
        ("deleted facts still answered (leak)", "-", pct(memory.get("delete", {}).get("leak"))),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'dense':>8}  {cfg.design:>8}"]
    lines += [f"{a:<{width}}  {b:>8}  {c:>8}" for a, b, c in rows]
    return "\n".join(lines)


def _row(r, g) -> dict:
    return {"question": _line(r.prompt), "gold": r.answer, "answer": g.text.strip(), "used": g.retrieved}


def _line(prompt: str) -> str:
    return " ".join(prompt.split())  # "Q: ...?\nA:" on one line


def _answer(text: str) -> str:
    """What the reader sees: the text after the last lookup (LMLM writes ``<|db_entity|> ... <|db_end|>``)."""
    return text.rsplit(DB_END, 1)[-1].strip()
