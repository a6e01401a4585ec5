"""``memlm eval qa``: greedy QA exact match of a trained model on a benchmark split."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (knowledge QA)")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="TASK")
    qa = sub.add_parser(
        "qa",
        help="exact match on held-out questions",
        description="Greedy answers to qa/{split}.jsonl of a bios/geo folder; writes JSON, markdown and predictions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    qa.add_argument("--model", required=True, help="checkpoint folder (Generator.from_pretrained)")
    qa.add_argument("--data", required=True, help="benchmark folder written by `memlm data bios|geo`")
    qa.add_argument(
        "--split", default="unseen", help="seen | unseen | edited | deleted | all (= seen + unseen)"
    )
    qa.add_argument("--max-new-tokens", type=int, default=32)
    qa.add_argument("--batch-size", type=int, default=64)
    qa.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    qa.add_argument("--device", default="cpu")
    qa.add_argument("--out", default=None, help="output folder (default: MODEL/eval)")
    qa.set_defaults(func=run_qa)


def run_qa(args) -> int:
    from memlm.eval.qa import evaluate_qa, load_qa, markdown_table, write_report
    from memlm.generate import Generator

    records = load_qa(args.data, args.split)
    if args.limit is not None:
        records = records[: args.limit]
    gen = Generator.from_pretrained(args.model, device=args.device)
    report = evaluate_qa(
        gen, records, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=True
    )
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    meta = {"model": str(args.model), "data": str(args.data), "split": args.split}
    path = write_report(report, out, f"qa_{args.split}", meta=meta)
    print(markdown_table(report, title=f"QA exact match — {args.split}"), end="")
    print(f"wrote {path}")
    return 0
