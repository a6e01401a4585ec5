"""``memlm eval qa|edit|delete``: knowledge QA of a trained model, and knowledge updates with no training."""

from __future__ import annotations

import argparse
from pathlib import Path

from memlm.cli import add_memory_option


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (e.g. runs/rag/final)")
    p.add_argument("--data", required=True, help="benchmark folder written by `memlm data bios|geo`")
    p.add_argument(
        "--bank", default=None, help="bank folder a memory model reads (default: its training bank)"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--limit", type=int, default=None, help="use only the first N questions / edits / deletions"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output folder (default: MODEL/eval)")
    add_memory_option(p)


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (knowledge QA, edits, deletions)")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="TASK")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    qa = sub.add_parser(
        "qa",
        help="exact match on held-out questions",
        description="Greedy answers to qa/{split}.jsonl of a bios/geo folder; writes JSON, markdown and "
        "predictions (with the bank entries each answer used).",
        formatter_class=fmt,
    )
    _common(qa)
    qa.add_argument(
        "--split", default="unseen", help="seen | unseen | edited | deleted | all (= seen + unseen)"
    )
    qa.add_argument(
        "--sample", type=int, default=None, help="a seeded random sample of N questions (quick evaluations)"
    )
    qa.add_argument(
        "--phrasing",
        default="eval",
        help="eval: the held-out question templates (the QA files); train: the same questions phrased as the "
        "corpus's drills, to tell an unseen phrasing from an unseen person (output qa_{split}_train); or a JSON "
        'file of your own templates, {"relation": ["Who employs {s}?", ...]} (output qa_{split}_{file stem})',
    )
    qa.set_defaults(func=run_qa)
    edit = sub.add_parser(
        "edit",
        help="apply edits.jsonl to a copy of the bank, no training: new values answered, others kept",
        description="Asks qa/edited.jsonl and an equal sample of unaffected questions before and after "
        "applying edits.jsonl to a copy of the bank (the original is never touched).",
        formatter_class=fmt,
    )
    _common(edit)
    edit.add_argument("--seed", type=int, default=0, help="sample of unaffected questions")
    edit.set_defaults(func=run_edit)
    delete = sub.add_parser(
        "delete",
        help="delete deletions.jsonl from a copy of the bank, no training: how many are still answered",
        description="Asks qa/deleted.jsonl after deleting deletions.jsonl from a copy of the bank.",
        formatter_class=fmt,
    )
    _common(delete)
    delete.set_defaults(func=run_delete)


def run_qa(args) -> int:
    from memlm.eval.qa import load_qa, markdown_table, rephrase, sample_questions, write_report
    from memlm.generate import Generator

    records = sample_questions(load_qa(args.data, args.split), args.sample)
    if args.limit is not None:
        records = records[: args.limit]
    if args.phrasing != "eval":
        records = rephrase(records, args.data, args.phrasing)
    options = dict(args.memory_options)
    gen = Generator.from_pretrained(args.model, device=args.device, bank=args.bank, memory_options=options)
    try:
        report, bank = _qa(gen, records, args)
    finally:
        if hasattr(gen, "close"):
            gen.close()
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    meta = {"model": str(args.model), "data": str(args.data), "split": args.split, "memory_options": options}
    meta["bank"] = None if bank is None else str(bank.path)
    meta["phrasing"] = args.phrasing
    tag = args.phrasing if args.phrasing in ("eval", "train") else Path(args.phrasing).stem
    name = f"qa_{args.split}" + ("" if tag == "eval" else f"_{tag}")
    path = write_report(report, out, name, meta=meta)
    print(markdown_table(report, title=f"QA exact match — {name}"), end="")
    print(f"wrote {path}")
    return 0


def _qa(gen, records, args):
    from memlm.eval.qa import bank_entry_ids, evaluate_qa, reader_bank

    report = evaluate_qa(
        gen,
        records,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        fact_to_entry_id=bank_entry_ids(gen, records),
        progress=True,
    )
    return report, reader_bank(gen)


def _write(result: dict, args, name: str) -> Path:
    from memlm.utils.io import write_json

    path = (Path(args.out) if args.out else Path(args.model) / "eval") / f"{name}.json"
    write_json(path, result)
    return path


def run_edit(args) -> int:
    from memlm.eval.update import evaluate_edits

    r = evaluate_edits(
        args.model, args.data, bank=args.bank, limit=args.limit, seed=args.seed, device=args.device,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=True,
        memory_options=dict(args.memory_options),
    )  # fmt: skip
    print(
        f"edits {r['edits']} (questions {r['questions']}), no training step:\n"
        f"  new value answered  {r['new_value_rate']:.3f}   (before the edit: {r['new_value_rate_before']:.3f}; "
        f"old value still answered: {r['old_value_rate_after']:.3f})\n"
        f"  others unchanged    {r['others_unchanged']:.3f}   (n={r['others']}; EM {r['others_em_before']:.3f} "
        f"-> {r['others_em_after']:.3f})\n"
        f"  visible after       {r['visible_after_s']:.2f} s (apply {r['apply_s']:.2f} s + refresh {r['refresh_s']:.2f} s)"
    )
    print(f"wrote {_write(r, args, 'edit')}")
    return 0


def run_delete(args) -> int:
    from memlm.eval.update import evaluate_deletions

    r = evaluate_deletions(
        args.model, args.data, bank=args.bank, limit=args.limit, device=args.device,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=True,
        memory_options=dict(args.memory_options),
    )  # fmt: skip
    print(
        f"deletions {r['deletions']} (questions {r['questions']}), no training step:\n"
        f"  still answered (leak) {r['leak']:.3f}   (answered before deletion: {r['answered_before']:.3f})\n"
        + "".join(
            f"    {side + ' entities':<19} {v['leak']:.3f} of {v['n']}"
            + ("   (also in the training text: may come from the weights)\n" if side == "seen" else "\n")
            for side, v in r["leak_by_entity"].items()
        )
        + f"  deleted entries read  {r['deleted_entries_read_after']}\n"
        f"  visible after         {r['visible_after_s']:.2f} s"
    )
    print(f"wrote {_write(r, args, 'delete')}")
    return 0
