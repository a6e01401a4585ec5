"""Write a knowledge benchmark — facts, training corpora, QA, splits, edits, deletions — from entities.

bios and geo both describe entities (a person, a country, a city) by a few ``(relation, object)`` facts;
this module turns a stream of them into the same folder layout, so every evaluation reads both alike::

    facts.jsonl                 every fact, line index = fact_id (format: memlm.data.facts)
    corpus/train.jsonl          {"text": ...} one document per line: the seen entities' descriptions + QA drills
    corpus/train_lmlm.jsonl     the same documents, line for line, with LMLM lookup calls
    corpus/low_{P}.jsonl        low-data corpora: the first P% of entities (nested: 1% ⊂ 10% ⊂ 100%)
    corpus/low_{P}_lmlm.jsonl
    qa/seen.jsonl, qa/unseen.jsonl      one held-out question per fact (original answers)
    qa/edited.jsonl, qa/deleted.jsonl   questions on the edit and deletion sets
    edits.jsonl, deletions.jsonl
    splits/seen.txt, splits/unseen.txt, splits/low_{P}.txt   one subject per line
    meta.json                   config, counts, templates

Why question templates are split in two: the corpus drills the answer format with *training* question
templates ("Q: Where was X born?\\nA: Paris"), while QA files use *held-out* templates that never occur in
any corpus, so a correct answer shows knowledge, not a memorised string.

Entities are assigned to splits by a seeded rank: ``seen`` = rank < seen_fraction * N; low-data subset P =
rank < P% * N. Edits and deletions are disjoint random shares of facts (from both splits).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from memlm.data.annotate import render
from memlm.utils.io import atomic_path

QA_PROMPT = "Q: {question}\nA:"
SPLITS = ("seen", "unseen")
QA_SPLITS = ("seen", "unseen", "edited", "deleted")


def qa_prompt(question: str) -> str:
    """The prompt a model answers by greedy decoding; the answer follows after one space."""
    return QA_PROMPT.format(question=question)


@dataclass(frozen=True)
class Templates:
    """Per relation: statement paraphrases (first = the canonical ``text`` of a fact), training question
    templates (appear in the corpus) and evaluation question templates (never appear in it).
    ``{s}`` is the subject, ``{o}`` the object."""

    statements: dict[str, tuple[str, ...]]
    train_questions: dict[str, tuple[str, ...]]
    eval_questions: dict[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Entity:
    subject: str  # unique identifier, also how the text names the entity
    facts: tuple[tuple[str, str], ...]  # (relation, object), in fact_id order
    first_fact_id: int  # fact_id of facts[0]
    split: str  # "seen" | "unseen"
    low_data: int  # smallest low-data percentage whose corpus covers this entity (0: none)
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchmarkConfig:
    seed: int = 0
    seen_fraction: float = 0.5  # share of entities whose descriptions are in corpus/train
    low_data: tuple[int, ...] = (1, 10, 100)  # percentages of entities covered by corpus/low_P
    edit_share: float = 0.1  # share of facts that get a new value in edits.jsonl
    delete_share: float = 0.05  # share of facts in deletions.jsonl (disjoint from the edits)
    docs_per_entity: int = 2  # descriptions per entity, each with its own paraphrases and sentence order
    qa_docs: bool = True  # add one training-template QA document per fact of a covered entity
    lmlm: bool = True  # also write the *_lmlm.jsonl corpora
    namespace: str = "default"

    def __post_init__(self) -> None:
        if not 0.0 <= self.seen_fraction <= 1.0:
            raise ValueError("seen_fraction must be in [0, 1]")
        if self.edit_share < 0 or self.delete_share < 0 or self.edit_share + self.delete_share > 1:
            raise ValueError("edit_share and delete_share must be >= 0 and sum to <= 1")
        if any(not 0 < p <= 100 for p in self.low_data):
            raise ValueError("low_data percentages must be in (0, 100]")


def split_ranks(n: int, seed: int) -> np.ndarray:
    """rank[i] = position of entity i in a seeded permutation; splits are prefixes of that order."""
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    rank = np.empty(n, dtype=np.int64)
    rank[perm] = np.arange(n)
    return rank


def split_of(rank: int, n: int, config: BenchmarkConfig) -> tuple[str, int]:
    """(split, low_data) of the entity with this rank among n."""
    split = "seen" if rank < round(config.seen_fraction * n) else "unseen"
    covering = [p for p in sorted(config.low_data) if rank < round(p * n / 100)]
    return split, covering[0] if covering else 0


def output_names(config: BenchmarkConfig) -> list[str]:
    """Every file a benchmark writes (meta.json aside), relative to its folder."""
    corpora = ["train"] + [f"low_{p}" for p in sorted(config.low_data)]
    names = ["facts.jsonl", "edits.jsonl", "deletions.jsonl"]
    for c in corpora:
        names.append(f"corpus/{c}.jsonl")
        if config.lmlm:
            names.append(f"corpus/{c}_lmlm.jsonl")
    names += [f"qa/{s}.jsonl" for s in QA_SPLITS]
    names += [f"splits/{s}.txt" for s in SPLITS] + [f"splits/low_{p}.txt" for p in sorted(config.low_data)]
    return names


# One encoder for every record: json.dumps(..., sort_keys=True) builds a new one per call, which dominates
# the cost of a million small records.
_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True)
_json_str = json.encoder.encode_basestring  # the string encoder json.dumps(ensure_ascii=False) uses


def _fact_line(
    subject: str, relation: str, obj: str, text: str, namespace: str, aliases: tuple[str, ...]
) -> str:
    """== Fact(...).to_json(), written out by hand for speed (a test checks they agree)."""
    q = _json_str
    head = '{"aliases": [' + ", ".join(map(q, aliases)) + "], " if aliases else "{"
    return (
        f'{head}"namespace": {q(namespace)}, "object": {q(obj)}, "relation": {q(relation)}, '
        f'"subject": {q(subject)}, "text": {q(text)}}}'
    )


def _qa_line(r: dict) -> str:
    """== json.dumps(r, sort_keys=True, ensure_ascii=False) for a main QA record, by hand for speed."""
    q = _json_str
    return (
        f'{{"answer": {q(r["answer"])}, "entity_split": {q(r["entity_split"])}, "fact_id": {r["fact_id"]}, '
        f'"low_data": {r["low_data"]}, "prompt": {q(r["prompt"])}, "question": {q(r["question"])}, '
        f'"relation": {q(r["relation"])}, "split": {q(r["split"])}, "subject": {q(r["subject"])}, '
        f'"template": {r["template"]}}}'
    )


NewValue = Callable[[str, str, random.Random], str]


def render_entities(
    entities: Iterable[Entity],
    templates: Templates,
    config: BenchmarkConfig,
    rng: random.Random,
    new_value: NewValue,
) -> dict[str, str]:
    """All output lines that these entities contribute, per file name (each line ends in a newline).

    Pure function of its inputs and ``rng``'s state, so chunks rendered in worker processes come out the
    same as in one process.
    """
    out: dict[str, list[str]] = {name: [] for name in output_names(config)}
    docs: list[tuple[str, str, int, bool]] = []  # (plain, annotated, low_data, seen)
    dumps = _ENCODER.encode
    pick = rng.random  # seq[int(pick() * len(seq))]: a uniform choice, cheaper than randrange
    for ent in entities:
        s = ent.subject
        out[f"splits/{ent.split}.txt"].append(s)
        for p in config.low_data:
            if ent.low_data and ent.low_data <= p:
                out[f"splits/low_{p}.txt"].append(s)
        for j, (rel, obj) in enumerate(ent.facts):
            fid = ent.first_fact_id + j
            text, _ = render(templates.statements[rel][0], s, rel, obj)
            out["facts.jsonl"].append(_fact_line(s, rel, obj, text, config.namespace, ent.aliases))
            qs = templates.eval_questions[rel]
            t = int(pick() * len(qs))
            question = qs[t].replace("{s}", s)
            qa = {
                "question": question,
                "prompt": qa_prompt(question),
                "answer": obj,
                "subject": s,
                "relation": rel,
                "fact_id": fid,
                "split": ent.split,
                "entity_split": ent.split,
                "low_data": ent.low_data,
                "template": t,
            }
            out[f"qa/{ent.split}.jsonl"].append(_qa_line(qa))
            u = pick()
            if u < config.edit_share:
                new = new_value(rel, obj, rng)
                new_text, _ = render(templates.statements[rel][0], s, rel, new)
                edit = {"fact_id": fid, "subject": s, "relation": rel, "old_object": obj, "object": new}
                out["edits.jsonl"].append(dumps(edit | {"text": new_text}))
                qa_e = qa | {"split": "edited", "answer": new, "old_answer": obj}
                out["qa/edited.jsonl"].append(dumps(qa_e))
            elif u < config.edit_share + config.delete_share:
                dele = {"fact_id": fid, "subject": s, "relation": rel, "object": obj, "text": text}
                out["deletions.jsonl"].append(dumps(dele))
                out["qa/deleted.jsonl"].append(dumps(qa | {"split": "deleted"}))
        seen, low = ent.split == "seen", ent.low_data
        if not (seen or low):
            continue
        for _ in range(config.docs_per_entity):
            order = list(range(len(ent.facts)))
            rng.shuffle(order)
            plain, annotated = [], []
            for j in order:
                rel, obj = ent.facts[j]
                forms = templates.statements[rel]
                p_, a_ = render(forms[int(pick() * len(forms))], s, rel, obj)
                plain.append(p_)
                annotated.append(a_)
            docs.append((" ".join(plain), " ".join(annotated), low, seen))
        if config.qa_docs:
            for rel, obj in ent.facts:
                qs = templates.train_questions[rel]
                q = qs[int(pick() * len(qs))].replace("{s}", s)
                p_, a_ = render(qa_prompt(q) + " {o}", s, rel, obj)
                docs.append((p_, a_, low, seen))
    # Shuffle documents within the chunk so a packed sequence mixes entities (order is seeded).
    rng.shuffle(docs)
    for plain, annotated, low, seen in docs:
        line_p = '{"text": ' + _json_str(plain) + "}"  # == json.dumps({"text": plain}), faster
        line_a = '{"text": ' + _json_str(annotated) + "}"
        targets = (["train"] if seen else []) + [f"low_{p}" for p in config.low_data if low and low <= p]
        for c in targets:
            out[f"corpus/{c}.jsonl"].append(line_p)
            if config.lmlm:
                out[f"corpus/{c}_lmlm.jsonl"].append(line_a)
    return {name: "\n".join(lines) + "\n" if lines else "" for name, lines in out.items()}


@dataclass
class BenchmarkWriter:
    """Appends rendered chunks to the output files of one benchmark folder, opened in a temporary folder
    that replaces ``out`` only when everything is written (:func:`memlm.utils.io.atomic_path`).

    Worker processes write their chunk to part files under :attr:`parts` (:func:`write_parts`) and the
    writer appends those with a buffered copy: no megabytes of text travel through pipes.
    """

    root: Path
    config: BenchmarkConfig
    counts: dict[str, int] = field(default_factory=dict)
    _files: dict = field(default_factory=dict)

    @property
    def parts(self) -> Path:
        return self.root / ".parts"

    def write(self, chunk: dict[str, str]) -> None:
        for name, text in chunk.items():
            if text:
                self._files[name].write(text.encode("utf-8"))
                self.counts[name] += text.count("\n")

    def append_parts(self, parts: dict[str, tuple[str, int]]) -> None:
        """Append part files written by :func:`write_parts` (and delete them)."""
        for name, (path, lines) in parts.items():
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self._files[name], 1 << 24)
            os.remove(path)
            self.counts[name] += lines

    def line_counts(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def write_parts(chunk: dict[str, str], parts: Path, index: int) -> dict[str, tuple[str, int]]:
    """Write one rendered chunk as part files ``parts/<index>.<n>``; return name -> (path, line count)."""
    out = {}
    for n, (name, text) in enumerate(chunk.items()):
        if text:
            path = parts / f"{index:06d}.{n}"
            path.write_bytes(text.encode("utf-8"))
            out[name] = (str(path), text.count("\n"))
    return out


@contextmanager
def open_benchmark(out: str | os.PathLike, config: BenchmarkConfig, meta: dict) -> Iterator[BenchmarkWriter]:
    """Open every output file under a temporary folder; on success write meta.json and move into place."""
    with atomic_path(out) as tmp, ExitStack() as stack:
        writer = BenchmarkWriter(Path(tmp), config)
        writer.parts.mkdir(parents=True)
        for name in output_names(config):
            path = writer.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            # Binary: "\n" line ends on every platform, so files are byte-identical everywhere.
            writer._files[name] = stack.enter_context(path.open("wb"))
            writer.counts[name] = 0
        yield writer
        stack.close()
        shutil.rmtree(writer.parts)
        full = {"config": asdict(config), "lines": writer.line_counts(), **meta}
        (writer.root / "meta.json").write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")


def templates_json(templates: Templates) -> dict:
    return {k: {r: list(v) for r, v in d.items()} for k, d in asdict(templates).items()}
