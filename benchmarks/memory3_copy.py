"""Memory³: which answer tokens come from the memory read.

For a trained Memory³ model and questions of a bios/geo split: the answer is scored teacher-forced after the
prompt twice, once reading the question's own fact (its gold entry) and once reading another entity's fact of
the same relation. Per relation, the mean NLL of the answer's first token and of the rest under each memory. A
model that copies the whole value from memory has a low NLL with the gold entry for both, and a high one with
the other; a model that reads only the first token from memory and continues from its weights has the same
NLL for the rest under both memories (the failure `docs/results_memory3.md` describes for dates and employers).

    .venv/bin/python benchmarks/memory3_copy.py --model runs/memory3/final --data data/bios \\
        --json benchmarks/results/memory3/copy.json
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path


def answer_nll(model, tokenizer, reader, prompt: str, answer: str, entry_id: int) -> list[float]:
    """NLL of each answer token after ``prompt``, the model reading entry ``entry_id`` only."""
    import torch

    from memlm.model.memory import MemoryContext

    p = tokenizer.encode(prompt, bos=True)
    a = tokenizer.encode(" " + answer)
    x = torch.tensor([p + a[:-1]])
    memory = MemoryContext(inputs=reader.read([[entry_id]], [prompt]))
    with torch.no_grad():
        logp = model(x, memory=memory).logits[0].float().log_softmax(-1)
    return [-float(logp[len(p) - 1 + i, t]) for i, t in enumerate(a)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a trained Memory³ model folder (RUN/final)")
    ap.add_argument("--data", required=True, help="the bios/geo folder it was trained on")
    ap.add_argument("--split", default="unseen")
    ap.add_argument("--per-relation", type=int, default=40, help="questions per relation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from memlm.generate import Generator

    with Generator.from_pretrained(args.model) as gen:
        if gen.model.config.memory != "memory3":
            raise SystemExit(
                f"{args.model} is a {gen.model.config.memory!r} model; this benchmark reads Memory³"
            )
        out = copy_nll(gen, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


def copy_nll(gen, args) -> dict:
    """Per relation: mean NLL of the answer's first token and of the rest, reading its own fact or another's."""
    from memlm.eval.qa import bank_entry_ids, load_qa

    records = load_qa(args.data, args.split)
    entry_of = bank_entry_ids(gen, records)
    rng = random.Random(args.seed)
    by_relation: dict[str, list] = defaultdict(list)
    for r in records:
        by_relation[r.relation].append(r)
    out: dict = {"model": args.model, "data": args.data, "split": args.split, "relations": {}}
    for relation, rs in sorted(by_relation.items()):
        sums: dict[str, list[float]] = defaultdict(list)
        for r in rng.sample(rs, min(args.per_relation, len(rs))):
            other = rng.choice([o for o in rs if o.answer != r.answer and o.subject != r.subject])
            for name, entry in (("gold", entry_of(r)), ("other", entry_of(other))):
                nll = answer_nll(gen.model, gen.tokenizer, gen.reader, r.prompt, r.answer, entry)
                sums[f"first_{name}"].append(nll[0])
                if len(nll) > 1:
                    sums[f"rest_{name}"].append(sum(nll[1:]) / (len(nll) - 1))
        row = {k: sum(v) / len(v) for k, v in sums.items()}
        row["n"] = len(sums["first_gold"])
        out["relations"][relation] = row
        print(
            f"{relation:14s} first token NLL gold {row['first_gold']:6.3f} other {row['first_other']:6.3f}"
            + (
                f"   rest gold {row['rest_gold']:6.3f} other {row['rest_other']:6.3f}"
                if "rest_gold" in row
                else ""
            ),
            flush=True,
        )
    return out


if __name__ == "__main__":
    main()
