"""What an LMLM model's lookups did on a QA split: lookup rate, lookup precision, EM given a right / wrong lookup,
per relation, and why the wrong ones were wrong (entity, relation, both, no match).

Reads the predictions that ``memlm eval qa`` wrote (``MODEL/eval/qa_SPLIT_predictions.jsonl``: each output keeps
its lookup calls) and the benchmark's ``facts.jsonl`` (the gold subject and relation of each question)::

    python benchmarks/lmlm_lookups.py RUN/final/eval/qa_unseen_predictions.jsonl --data /work/exp/bios2k

``--run MODEL --options '{"relation": "context"}'`` first runs the split with those memory options changed;
``--ablate MODEL`` first runs the QA split with the bank disabled (every lookup answers ``unknown``: the
paper's "without the database") and writes ``qa_SPLIT_nobank*`` beside the other evaluations::

    python benchmarks/lmlm_lookups.py --ablate RUN/final --data /work/exp/bios2k --split unseen --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from memlm.bank.entry import normalise
from memlm.data.annotate import parse_calls
from memlm.tokenizer import DB_ENTITY


def analyse(predictions: Path, data: Path) -> dict:
    facts = [json.loads(x) for x in (data / "facts.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in predictions.read_text().splitlines()]
    per: dict[str, Counter] = defaultdict(Counter)
    examples: dict[str, list] = defaultdict(list)
    for p in rows:
        gold = facts[p["fact_id"]]
        calls = parse_calls(p["output"])
        c = per[p["relation"]]
        c["n"] += 1
        c["em"] += p["correct"]
        if not calls:
            c["no_lookup"] += 1
            c["cut_mid_call" if DB_ENTITY in p["output"] else "never_asked"] += 1  # too few new tokens?
            continue
        call = calls[0]  # the lookup that answers the question
        c["lookup"] += 1
        right = bool(p["hit"])
        c["right"] += right
        c["em_right"] += right and p["correct"]
        c["em_wrong"] += (not right) and p["correct"]
        if not right:
            ent = normalise(call.entity) == normalise(gold["subject"])
            rel = normalise(call.relation) == normalise(gold["relation"])
            why = "no_match" if ent and rel else "entity" if rel else "relation" if ent else "both"
            c[f"wrong_{why}"] += 1
            if len(examples[p["relation"]]) < 5:
                examples[p["relation"]].append(
                    {"gold": [gold["subject"], gold["relation"]], "asked": [call.entity, call.relation],
                     "value": call.value, "output": p["output"][:160]}
                )  # fmt: skip

    def summary(c: Counter) -> dict:
        n, look, right = c["n"], c["lookup"], c["right"]
        wrong = look - right
        return {
            "n": n,
            "em": c["em"] / n,
            "lookup_rate": look / n,
            "lookup_precision": right / look if look else 0.0,
            "em_given_right_lookup": c["em_right"] / right if right else None,
            "em_given_wrong_lookup": c["em_wrong"] / wrong if wrong else None,
            "wrong_entity": c["wrong_entity"],
            "wrong_relation": c["wrong_relation"],
            "wrong_both": c["wrong_both"],
            "wrong_no_match": c["wrong_no_match"],
            "no_lookup": c["no_lookup"],
            "cut_mid_call": c["cut_mid_call"],
        }

    total = sum(per.values(), Counter())
    return {
        "predictions": str(predictions),
        "all": summary(total),
        "per_relation": {r: summary(c) for r, c in sorted(per.items())},
        "wrong_examples": dict(examples),
    }


def run_qa(model_dir: Path, data: Path, split: str, max_new_tokens: int, batch_size: int, **options) -> Path:
    """QA with the checkpoint's memory options changed (``disabled=True``: every lookup answered ``unknown``;
    ``relation="context"``: the relation its question asks for). Writes ``qa_SPLIT_<options>*``."""
    from memlm.eval.qa import evaluate_qa, load_qa, markdown_table, write_report
    from memlm.generate import Generator
    from memlm.model.checkpoint import load_pretrained
    from memlm.model.memory.binding import load_reader

    model, tok = load_pretrained(model_dir)
    model.config.memory_options = {**model.config.memory_options, **options}
    tag = "_".join("nobank" if k == "disabled" and v is True else f"{k}-{v}" for k, v in options.items())
    with Generator(model, tok, reader=load_reader(model_dir, model, tok)) as gen:
        report = evaluate_qa(
            gen, load_qa(data, split), max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True
        )
    meta = {"model": str(model_dir), "data": str(data), "split": split, "memory_options": options}
    print(markdown_table(report, title=f"QA exact match — {split}, {options}"), end="")
    return write_report(report, model_dir / "eval", f"qa_{split}_{tag}", meta=meta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("predictions", nargs="?", type=Path, help="qa_SPLIT_predictions.jsonl of memlm eval qa")
    p.add_argument("--data", required=True, type=Path, help="the benchmark folder (facts.jsonl)")
    p.add_argument("--ablate", type=Path, help="model folder: run --split with the bank disabled first")
    p.add_argument("--run", type=Path, help="model folder: run --split with --options first")
    p.add_argument(
        "--options",
        type=json.loads,
        default={},
        help='memory options to change, e.g. {"relation": "context"}',
    )
    p.add_argument("--split", default="unseen")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", type=Path, help="also write the analysis here")
    args = p.parse_args()
    if args.ablate or args.run:
        options = {"disabled": True} if args.ablate else args.options
        path = run_qa(
            args.ablate or args.run, args.data, args.split, args.max_new_tokens, args.batch_size, **options
        )
        args.predictions = path.with_name(path.stem + "_predictions.jsonl")
    if args.predictions is None:
        p.error("give a predictions file or --ablate MODEL")
    out = analyse(args.predictions, args.data)
    print(
        "| relation | n | EM | lookup rate | precision | EM right | EM wrong | wrong: entity / relation / both / none |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name, s in [("**all**", out["all"]), *out["per_relation"].items()]:
        print(
            f"| {name} | {s['n']} | {s['em']:.3f} | {s['lookup_rate']:.3f} | {s['lookup_precision']:.3f} "
            f"| {fmt(s['em_given_right_lookup'])} | {fmt(s['em_given_wrong_lookup'])} "
            f"| {s['wrong_entity']} / {s['wrong_relation']} / {s['wrong_both']} / {s['wrong_no_match']} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
