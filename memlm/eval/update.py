"""Knowledge updates with no training: edit or delete facts in a *copy* of the bank and ask again.

``evaluate_edits``: the benchmark's ``edits.jsonl`` gives some facts a new value. Before and after applying
them to the copy, ask ``qa/edited.jsonl`` (the edited facts, on held-out question templates) and an equal
seeded sample of unaffected questions. Reported: the share of edited facts answered with the new value (target
>= 95%), the share of the other answers left unchanged (target >= 98%), and how long the change took to become
visible (applying the edits to the bank, then the reader's refresh of its derived state: re-encoding the
changed entries, updating the index).

``evaluate_deletions``: delete ``deletions.jsonl`` from the copy and report the share of deleted facts still
answered with their old value (the leak; target <= 1%; the LMLM audit found 0.7-13.6%), overall and apart for
seen and unseen entities (a seen entity's fact is also in the model's weights).

The original bank is only read (its files are copied byte for byte), never opened for writing: a test checks
that every file of it is byte-identical afterwards.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from memlm.bank.derived import ROOTS as DERIVED_ROOTS
from memlm.bank.entry import lookup_key
from memlm.bank.store import DB_NAME, BankError, MemoryBank
from memlm.errors import InputError
from memlm.eval.qa import QARecord, QAReport, evaluate_qa, exact_match, load_qa
from memlm.utils.jsonl import iter_jsonl


def copy_bank(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a bank folder by reading its files (database, write-ahead log, vectors, indexes and other derived stores).

    Only reads ``src``: no SQLite connection is opened on it, so not even a ``-shm`` file appears there.
    Copy while no writer is mid-transaction; the copy is checked before use.
    """
    src, dst = Path(src), Path(dst)
    if not (src / DB_NAME).is_file():
        raise BankError(f"{src}: not a memlm bank (no {DB_NAME})")
    dst.mkdir(parents=True, exist_ok=False)
    for name in (DB_NAME, DB_NAME + "-wal"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    for sub in ("vectors", *DERIVED_ROOTS):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dst / sub)
    return dst


@contextmanager
def bank_copy(src: str | os.PathLike, keep: str | os.PathLike | None = None):
    """A writable copy of ``src`` in a temporary folder (or at ``keep``, left there), opened."""
    tmp = None
    if keep is None:
        tmp = tempfile.mkdtemp(prefix="memlm-bank-copy-")
        dst = Path(tmp) / "bank"
    else:
        dst = Path(keep)
    try:
        copy_bank(src, dst)
        bank = MemoryBank.open(dst)
        problems = bank.verify()
        if problems:
            raise BankError(f"{src}: copy is not consistent ({problems[0]}); is a writer busy with it?")
        try:
            yield bank
        finally:
            bank.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def entry_ids_by_key(bank: MemoryBank, records: Sequence[dict], *, path: Path | None = None) -> list[int]:
    """The bank entry of each record's ``(subject, relation)`` (benchmark facts are unique by it)."""
    out = []
    for lineno, r in enumerate(records, start=1):
        rows = bank.connection.execute(
            "SELECT id FROM entries WHERE key=? ORDER BY id", (lookup_key(r["subject"], r["relation"]),)
        ).fetchall()
        if len(rows) != 1:
            what = "no entry" if not rows else f"{len(rows)} entries"
            raise InputError(
                f"{what} in {bank.path} for ({r['subject']!r}, {r['relation']!r})", path=path, line=lineno,
                field="subject",
            )  # fmt: skip
        out.append(rows[0][0])
    return out


def _records(path: Path, limit: int | None) -> list[dict]:
    out = []
    for lineno, obj in iter_jsonl(path):
        for key in ("subject", "relation", "object"):
            if not isinstance(obj.get(key), str):
                raise InputError("expected a string", path=path, line=lineno, field=key)
        out.append(obj)
        if limit is not None and len(out) >= limit:
            break
    return out


def _others(data_dir: Path, exclude: set[int], n: int, seed: int) -> list[QARecord]:
    """An equal, seeded sample of seen + unseen questions whose facts are neither edited nor deleted."""
    excluded = exclude | {r["fact_id"] for _, r in iter_jsonl(data_dir / "deletions.jsonl")}
    excluded |= {r["fact_id"] for _, r in iter_jsonl(data_dir / "edits.jsonl")}
    pool = [r for r in load_qa(data_dir, "all") if r.fact_id not in excluded]
    return random.Random(seed).sample(pool, min(n, len(pool)))


def _ask(gen, records: Sequence[QARecord], bank: MemoryBank, **kw) -> QAReport:
    """evaluate_qa with hits judged against the entry that holds each fact in *this* bank."""
    keys = {(r.subject, r.relation) for r in records}
    ids = dict(
        zip(keys, entry_ids_by_key(bank, [{"subject": s, "relation": r} for s, r in keys]), strict=True)
    )
    return evaluate_qa(gen, records, fact_to_entry_id=lambda r: ids.get((r.subject, r.relation)), **kw)


def _share(preds, answers: dict[int, str]) -> float:
    return sum(exact_match(p.output, answers[p.fact_id]) for p in preds) / max(len(preds), 1)


def _leak_by_entity(questions: Sequence[QARecord], preds, answers: dict[int, str]) -> dict[str, dict]:
    """The leak apart for seen and unseen entities. A seen entity's facts are also in the training text, so what is
    still answered after its entry is gone may come from the weights (no bank deletion removes that). An unseen
    entity's fact was only ever in the bank: its leak is the memory path's own, or a guess (on geo every design
    leaks more for unseen entities: a common timezone or continent is guessable)."""
    side = {r.fact_id: r.entity_split for r in questions}
    out = {}
    for name in ("seen", "unseen"):
        part = [p for p in preds if side.get(p.fact_id) == name]
        if part:
            out[name] = {"leak": _share(part, answers), "n": len(part)}
    return out


def _unchanged(before: QAReport, after: QAReport) -> float:
    same = [a.output.strip() == b.output.strip() for a, b in zip(before.predictions, after.predictions)]
    return sum(same) / max(len(same), 1)


def evaluate_edits(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    bank: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    max_new_tokens: int = 32,
    batch_size: int = 64,
    probes: int = 20,
    progress: bool = False,
    memory_options: dict | None = None,
) -> dict:
    """Apply ``edits.jsonl`` to a copy of the model's bank (default: its training bank) and measure."""
    from memlm.generate import Generator
    from memlm.model.memory.binding import open_model_bank

    data_dir = Path(data_dir)
    edits_path = data_dir / "edits.jsonl"
    edits = _records(edits_path, limit)
    if not edits:
        raise InputError("no edits to apply", path=edits_path)
    edited_ids = {e["fact_id"] for e in edits}
    questions = [r for r in load_qa(data_dir, "edited") if r.fact_id in edited_ids]
    old = {e["fact_id"]: e["old_object"] for e in edits}
    new = {e["fact_id"]: e["object"] for e in edits}
    others = _others(data_dir, edited_ids, len(questions), seed)
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)

    from memlm.model.checkpoint import read_config

    source = open_model_bank(model_dir, read_config(model_dir).memory, bank)
    src_path = source.path
    source.close()
    with bank_copy(src_path) as copy:
        gen = Generator.from_pretrained(model_dir, device=device, bank=copy, memory_options=memory_options)
        before, before_others = _ask(gen, questions, copy, **kw), _ask(gen, others, copy, **kw)
        ids = entry_ids_by_key(copy, edits, path=edits_path)
        t0 = time.perf_counter()
        for eid, e in zip(ids, edits):
            copy.update(
                eid, object=e["object"], **({"text": e["text"]} if isinstance(e.get("text"), str) else {})
            )
        t1 = time.perf_counter()
        gen.reader.refresh()
        t2 = time.perf_counter()
        after, after_others = _ask(gen, questions, copy, **kw), _ask(gen, others, copy, **kw)
        latency = _single_edit_latency(gen, copy, others[:probes])
    return {
        "model": str(model_dir),
        "data": str(data_dir),
        "bank": str(src_path),
        "edits": len(edits),
        "questions": len(questions),
        "new_value_rate": _share(after.predictions, new),  # target >= 0.95
        "old_value_rate_after": _share(after.predictions, old),
        "new_value_rate_before": _share(before.predictions, new),
        "old_value_rate_before": _share(before.predictions, old),
        "others": len(others),
        "others_unchanged": _unchanged(before_others, after_others),  # target >= 0.98
        "others_em_before": before_others.em,
        "others_em_after": after_others.em,
        "hit_rate_after": (after.retrieval or {}).get("hit_rate"),
        "apply_s": t1 - t0,
        "refresh_s": t2 - t1,
        "visible_after_s": t2 - t0,  # all edits applied and readable by the next query
        "single_edit_visible_s": latency,
        "training_steps": 0,
        "memory_options": memory_options or {},
        "reports": {
            "before": before.summary(),
            "after": after.summary(),
            "others_after": after_others.summary(),
        },
    }


def _single_edit_latency(gen, bank: MemoryBank, records: Sequence[QARecord]) -> dict | None:
    """p50/max seconds from one ``update`` to an answer that reads the new entry (edit + refresh + query)."""
    if not records:
        return None
    ids = entry_ids_by_key(bank, [{"subject": r.subject, "relation": r.relation} for r in records])
    times = []
    for eid, r in zip(ids, records):
        entry = bank.get(eid)
        t0 = time.perf_counter()
        bank.update(eid, text=entry.text + " ")  # a content change: re-encoded, re-indexed
        gen.generate([r.prompt], max_new_tokens=1)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"n": len(times), "p50": times[len(times) // 2], "max": times[-1]}


def evaluate_deletions(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    bank: str | os.PathLike | None = None,
    limit: int | None = None,
    device: str = "cpu",
    max_new_tokens: int = 32,
    batch_size: int = 64,
    progress: bool = False,
    memory_options: dict | None = None,
) -> dict:
    """Delete ``deletions.jsonl`` from a copy of the model's bank; report the share still answered (leak)."""
    from memlm.generate import Generator
    from memlm.model.checkpoint import read_config
    from memlm.model.memory.binding import open_model_bank

    data_dir = Path(data_dir)
    path = data_dir / "deletions.jsonl"
    deletions = _records(path, limit)
    if not deletions:
        raise InputError("no deletions to apply", path=path)
    deleted = {d["fact_id"] for d in deletions}
    questions = [r for r in load_qa(data_dir, "deleted") if r.fact_id in deleted]
    old = {d["fact_id"]: d["object"] for d in deletions}
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)

    source = open_model_bank(model_dir, read_config(model_dir).memory, bank)
    src_path = source.path
    source.close()
    with bank_copy(src_path) as copy:
        gen = Generator.from_pretrained(model_dir, device=device, bank=copy, memory_options=memory_options)
        before = _ask(gen, questions, copy, **kw)
        ids = entry_ids_by_key(copy, deletions, path=path)
        t0 = time.perf_counter()
        copy.delete(ids)
        t1 = time.perf_counter()
        gen.reader.refresh()
        t2 = time.perf_counter()
        after = evaluate_qa(gen, questions, fact_to_entry_id=lambda r: None, **kw)  # no gold entry is left
        gone = set(ids)
        reread = sum(bool(set(p.retrieved or ()) & gone) for p in after.predictions)
    return {
        "model": str(model_dir),
        "data": str(data_dir),
        "bank": str(src_path),
        "deletions": len(deletions),
        "questions": len(questions),
        "leak": _share(after.predictions, old),  # target <= 0.01
        "leak_by_entity": _leak_by_entity(questions, after.predictions, old),
        "answered_before": _share(before.predictions, old),
        "deleted_entries_read_after": reread,  # must be 0: a deleted entry is never retrieved
        "apply_s": t1 - t0,
        "refresh_s": t2 - t1,
        "visible_after_s": t2 - t0,
        "training_steps": 0,
        "memory_options": memory_options or {},
        "reports": {"before": before.summary(), "after": after.summary()},
    }
