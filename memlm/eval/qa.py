"""Knowledge QA: greedy answers to held-out questions, scored by normalised exact match.

Works with any object that has ``generate(prompts: list[str], *, max_new_tokens: int) -> list`` whose items
are ``str`` or have ``.text`` and, for models that retrieve, ``.retrieved`` (bank entry ids the answer
used). "Hit" = the gold fact's entry id is among them. Entry ids come from ``fact_to_entry_id(record)``;
the default is the record's ``fact_id`` — its line index in ``facts.jsonl`` — which is the bank id when
``facts.jsonl`` is imported in order into a fresh bank. Pass a mapping otherwise (e.g. a bank lookup by
``(subject, relation)``).

An answer is cut at its first newline (the QA format puts one answer on the line after "A:"), LMLM lookup
calls are removed, then both sides are normalised SQuAD-style (case, punctuation, articles, spaces).
"""

from __future__ import annotations

import json
import os
import random
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from memlm.data.annotate import strip_calls
from memlm.data.benchmark import QA_PROMPT
from memlm.errors import InputError
from memlm.utils.io import atomic_path, write_json
from memlm.utils.jsonl import iter_jsonl

QA_FIELDS = {"prompt": str, "answer": str, "subject": str, "relation": str, "fact_id": int, "split": str}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True, slots=True)
class QARecord:
    prompt: str
    answer: str
    subject: str
    relation: str
    fact_id: int
    split: str
    entity_split: str | None = None  # seen | unseen: is the entity's text in training (edit/delete sets)
    template: int | None = None  # which of the relation's question templates phrased it (None: unknown)


@dataclass(frozen=True, slots=True)
class Prediction:
    fact_id: int
    split: str
    relation: str
    prompt: str
    answer: str
    output: str  # raw generated text
    correct: bool
    hit: bool | None  # None: the model reported no retrieval
    retrieved: tuple[int, ...] | None = None  # bank entry ids the answer used (provenance)
    template: int | None = None


@dataclass
class QAReport:
    n: int
    em: float
    per_split: dict[str, dict[str, float]]
    per_relation: dict[str, dict[str, float]]
    retrieval: dict[str, float] | None  # hit_rate, em_given_hit, em_given_miss, n (answers with a trace)
    per_phrasing: dict[str, dict[str, float]] = field(default_factory=dict)  # "relation/template": n, em, hit
    predictions: list[Prediction] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        """Everything but the predictions, JSON-ready."""
        d = asdict(self)
        d.pop("predictions")
        return d


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (NFKC first, so unicode forms agree)."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def extract_answer(generated: str) -> str:
    """The answer part of a generation: lookup calls removed, cut at the first newline."""
    return strip_calls(generated).split("\n", 1)[0]


def exact_match(generated: str, answer: str) -> bool:
    return normalize_answer(extract_answer(generated)) == normalize_answer(answer)


def load_qa(data_dir: str | os.PathLike, split: str) -> list[QARecord]:
    """QA records of ``data_dir/qa/{split}.jsonl``; ``split="all"`` = seen + unseen. Bad lines name the field."""
    splits = ("seen", "unseen") if split == "all" else (split,)
    records = []
    for s in splits:
        path = Path(data_dir) / "qa" / f"{s}.jsonl"
        if not path.is_file():
            raise InputError(f"no QA file for split {s!r}", path=path)
        for lineno, obj in iter_jsonl(path):
            for key, typ in QA_FIELDS.items():
                if not isinstance(obj.get(key), typ):
                    raise InputError(f"expected {typ.__name__}", path=path, line=lineno, field=key)
            side, template = obj.get("entity_split"), obj.get("template")
            if side is not None and not isinstance(side, str):
                raise InputError("expected str", path=path, line=lineno, field="entity_split")
            if template is not None and (not isinstance(template, int) or template < 0):
                raise InputError("expected an int >= 0", path=path, line=lineno, field="template")
            records.append(QARecord(**{k: obj[k] for k in QA_FIELDS}, entity_split=side, template=template))
    return records


PHRASINGS = ("eval", "train")


def rephrase(records: Sequence[QARecord], data_dir: str | os.PathLike, phrasing: str) -> list[QARecord]:
    """The same questions phrased with the benchmark's ``eval`` templates (as the QA files are: never in the
    training text), its ``train`` templates (those the corpus drills), or the templates of a JSON file
    (``{"relation": ["Where was {s} born?", ...]}``: phrasings of your own, that neither the repository nor
    the training text holds). Asking the same people several ways separates what a model cannot do for an
    unseen person from what it cannot do for an unseen phrasing. A question's template index picks among the
    relation's templates (modulo their number)."""
    templates, source = _templates(data_dir, phrasing)
    out = []
    for r in records:
        options = templates.get(r.relation)
        if not options:
            raise InputError(
                f"no {phrasing} template for relation {r.relation!r}", path=source, field="templates"
            )
        t = (r.template or 0) % len(options)
        question = options[t].format(s=r.subject)
        out.append(replace(r, prompt=QA_PROMPT.format(question=question), template=t))
    return out


def _templates(data_dir: str | os.PathLike, phrasing: str) -> tuple[dict, Path]:
    """relation -> question templates, and the file they come from: the benchmark's meta.json, or a file."""
    if phrasing in PHRASINGS:
        source, field = Path(data_dir) / "meta.json", f"templates.{phrasing}_questions"
    else:
        source, field = Path(phrasing), "templates"
    try:
        obj = json.loads(source.read_text(encoding="utf-8"))
        templates = obj["templates"][f"{phrasing}_questions"] if phrasing in PHRASINGS else obj
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"no question templates ({e})", path=source, field=field) from None
    if not isinstance(templates, dict):
        raise InputError("expected an object: relation -> list of templates", path=source, field=field)
    for relation, options in templates.items():
        if not isinstance(options, list) or not all(isinstance(t, str) and "{s}" in t for t in options):
            raise InputError(
                "expected a list of templates, each naming the subject as {s}", path=source, field=relation
            )
    return templates, source


def sample_questions(records: list, n: int | None) -> list:
    """The seeded sample every quick evaluation uses (``memlm eval qa --sample N``, ``memlm experiment``): the
    records shuffled with Random(0), the first ``n`` kept; ``None`` or ``n >= len``: all, in file order."""
    if n is None or n >= len(records):
        return records
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    return shuffled[:n]


def _text_and_retrieved(item) -> tuple[str, list[int] | None]:
    if isinstance(item, str):
        return item, None
    retrieved = getattr(item, "retrieved", None)
    return item.text, (None if retrieved is None else [int(i) for i in retrieved])


def _rate(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def reader_bank(generator):
    """The bank the generator's model reads, or None (a model without memory, or any QA-capable object)."""
    return getattr(getattr(generator, "reader", None), "bank", None)


def bank_entry_ids(generator, records: Sequence[QARecord]) -> Callable[[QARecord], int | None] | None:
    """question -> the id of its fact's entry in the bank the generator reads (a retrieval hit = that entry was
    used); None when the generator reads no bank."""
    bank = reader_bank(generator)
    if bank is None:
        return None
    from memlm.eval.update import entry_ids_by_key  # (update imports this module)

    keys = sorted({(r.subject, r.relation) for r in records})
    ids = dict(zip(keys, entry_ids_by_key(bank, [{"subject": s, "relation": r} for s, r in keys])))
    return lambda r: ids[(r.subject, r.relation)]


def evaluate_qa(
    generator,
    records: Sequence[QARecord],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    fact_to_entry_id: Callable[[QARecord], int | None] | None = None,
    progress: bool = False,
) -> QAReport:
    """Ask every question, greedy, in batches; score EM per split and relation, and retrieval hits."""
    from tqdm import tqdm

    entry_id = fact_to_entry_id or (lambda r: r.fact_id)
    preds: list[Prediction] = []
    for start in tqdm(range(0, len(records), batch_size), desc="qa", disable=not progress):
        batch = records[start : start + batch_size]
        outputs = generator.generate([r.prompt for r in batch], max_new_tokens=max_new_tokens)
        if len(outputs) != len(batch):
            raise ValueError(f"generate returned {len(outputs)} items for {len(batch)} prompts")
        for r, item in zip(batch, outputs):
            text, retrieved = _text_and_retrieved(item)
            hit = None if retrieved is None else entry_id(r) in retrieved
            ok = exact_match(text, r.answer)
            used = None if retrieved is None else tuple(retrieved)
            preds.append(
                Prediction(
                    r.fact_id, r.split, r.relation, r.prompt, r.answer, text, ok, hit, used, r.template
                )
            )

    def group(key) -> dict[str, dict[str, float]]:
        out: dict[str, list[bool]] = {}
        for p in preds:
            out.setdefault(key(p), []).append(p.correct)
        return {k: {"n": len(v), "em": _rate(v)} for k, v in sorted(out.items())}

    phrasings: dict[str, list[Prediction]] = {}
    for p in preds:
        if p.template is not None:
            phrasings.setdefault(f"{p.relation}/{p.template}", []).append(p)
    per_phrasing = {}
    for k, ps in sorted(phrasings.items()):
        per_phrasing[k] = {"n": len(ps), "em": _rate([p.correct for p in ps])}
        if all(p.hit is not None for p in ps):
            per_phrasing[k]["hit_rate"] = _rate([bool(p.hit) for p in ps])

    traced = [p for p in preds if p.hit is not None]
    retrieval = None
    if traced:
        hits = [p.correct for p in traced if p.hit]
        misses = [p.correct for p in traced if not p.hit]
        retrieval = {
            "n": len(traced),
            "hit_rate": len(hits) / len(traced),
            "em_given_hit": _rate(hits),
            "em_given_miss": _rate(misses),
        }
    return QAReport(
        n=len(preds),
        em=_rate([p.correct for p in preds]),
        per_split=group(lambda p: p.split),
        per_relation=group(lambda p: p.relation),
        retrieval=retrieval,
        per_phrasing=per_phrasing,
        predictions=preds,
    )


def markdown_table(report: QAReport, *, title: str = "QA exact match") -> str:
    lines = [f"### {title}", "", "| group | n | EM |", "| --- | ---: | ---: |"]
    lines.append(f"| **all** | {report.n} | {report.em:.3f} |")
    lines += [f"| split: {k} | {v['n']} | {v['em']:.3f} |" for k, v in report.per_split.items()]
    lines += [f"| relation: {k} | {v['n']} | {v['em']:.3f} |" for k, v in report.per_relation.items()]
    lines += [f"| phrasing: {k} | {v['n']} | {v['em']:.3f} |" for k, v in report.per_phrasing.items()]
    if report.retrieval:
        r = report.retrieval
        lines += [
            "",
            "| retrieval | n | hit rate | EM given hit | EM given miss |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| gold fact retrieved | {r['n']} | {r['hit_rate']:.3f} | {r['em_given_hit']:.3f} | {r['em_given_miss']:.3f} |",
        ]
    return "\n".join(lines) + "\n"


def write_report(
    report: QAReport, out_dir: str | os.PathLike, name: str, *, meta: dict | None = None
) -> Path:
    """Write ``{name}.json`` (summary + meta), ``{name}.md`` and ``{name}_predictions.jsonl``; return the JSON path."""
    out_dir = Path(out_dir)
    path = out_dir / f"{name}.json"
    write_json(path, {**(meta or {}), **report.summary()})
    with atomic_path(out_dir / f"{name}.md") as tmp:
        tmp.write_text(markdown_table(report, title=f"QA exact match — {name}"), encoding="utf-8")
    with atomic_path(out_dir / f"{name}_predictions.jsonl") as tmp, tmp.open("w", encoding="utf-8") as f:
        for p in report.predictions:
            f.write(json.dumps(asdict(p), sort_keys=True, ensure_ascii=False) + "\n")
    return path
