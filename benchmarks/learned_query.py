"""Where a learned query ranks the gold entry: ExplicitLM's and PlugLM's retrieval, taken apart.

For each question of a QA split, the memory layer's query at the prompt's last position is scored against every
key in the bank (exact search, the current encoder's keys) and the gold entry's rank is recorded; for ExplicitLM
also whether the product-key stage's candidates hold it. A wrong top-1 is split by what it names: another
person, or the same person's other fact; another person by the words of the name it shares with the gold's
(first word, last word, any other word, none: a query that holds the whole name confuses near names), the same
person's other fact by which relation it found instead of the question's. Exact top 1 is also given per
phrasing (relation/template); ``--phrasing train`` asks the same questions as the corpus's drills phrase them
(:func:`memlm.eval.qa.rephrase`), which tells an unseen phrasing from an unseen person::

    python benchmarks/learned_query.py --model RUN/final --data /work/exp/bios2k --split unseen --limit 300 \\
        --bank BANK_COPY --json benchmarks/results/explicitlm/tf_2k_s/learned_query.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from memlm.eval.qa import load_qa, rephrase
from memlm.model.checkpoint import load_pretrained
from memlm.model.memory.binding import load_reader


def _layer(model):
    """The first memory layer's module (ExplicitLM: ``cross``, PlugLM: ``memory``): it makes the query."""
    for block in model.blocks:
        for module in (block.cross, block.memory):
            if module is not None and hasattr(module, "retrieval_query"):
                return module
    raise SystemExit(f"{model.config.memory!r} has no learned query (explicitlm and pluglm do)")


def _shared(gold: str, got: str) -> str:
    """Which words of the gold subject's name the retrieved one shares: first, last, middle (any other), none."""
    a, b = gold.split(), got.split()
    if a[0] == b[0]:
        return "first"
    if a[-1] == b[-1]:
        return "last"
    return "middle" if set(a[1:-1]) & set(b[1:-1]) else "none"


@torch.no_grad()
def unseen_tokens(tok, corpus: Path, questions: list[dict]) -> dict[str, list[str]]:
    """Per phrasing (relation/template): the tokens of its question, subject left out, that the training corpus
    never contains (the model never learnt their embeddings)."""
    seen: set[int] = set()
    for line in corpus.read_text(encoding="utf-8").splitlines():
        seen.update(tok.encode(json.loads(line)["text"]))
    out = {}
    for q in questions:
        key = f"{q['relation']}/{q['template']}"
        if key not in out:
            words = q["prompt"].replace(" " + q["subject"], "")
            out[key] = [tok.decode([t]) for t in tok.encode(words) if t not in seen]
    return dict(sorted(out.items()))


def measure(
    model_dir: str, data: Path, split: str, limit: int, bank: str | None, phrasing: str = "eval",
    corpus: Path | None = None,
) -> dict:  # fmt: skip
    model, tok = load_pretrained(model_dir)
    model.eval()
    reader = load_reader(model_dir, model, tok, bank=bank)
    design = model.config.memory
    layer = _layer(model)
    seen: dict[str, torch.Tensor] = {}
    layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0]))
    questions = [asdict(r) for r in rephrase(load_qa(data, split)[:limit], data, phrasing)]
    facts = [json.loads(x) for x in (data / "facts.jsonl").read_text().splitlines()]
    n = top1 = top5 = coarse = other_person = 0
    by_phrasing: dict[str, list[bool]] = {}
    relations: dict[str, int] = {}  # same-person errors: "gold relation -> relation found"
    shares = {"first": 0, "last": 0, "middle": 0, "none": 0}  # other-person errors by the name words shared
    chance = dict.fromkeys(shares, 0.0)  # the same split if the wrong person were drawn at random
    people = sorted({f["subject"] for f in facts})
    if design == "explicitlm":  # its keys as the current encoder makes them: the same for every question
        table = reader.table
        keys, alive, bank_ids = table.encode_keys(model.memory, model.wte), table.alive, table.ids
    for q in questions:
        batch = reader.prompts([q["prompt"]])
        model(torch.tensor([batch.token_ids[0]]), memory=batch.memory)
        h = seen["h"].reshape(-1, seen["h"].shape[-1])[-1:]
        if getattr(layer, "text_query", None) is not None:  # PlugLM's query encoder: its term, last position
            text = layer._text_term(batch.memory.inputs, seen["h"].shape[1])[0, -1:]
            query = layer.retrieval_query(h, text).float()
        else:
            query = layer.retrieval_query(h).float()
        if design != "explicitlm":
            table = batch.memory.inputs.table
            keys, alive, bank_ids = table.keys, torch.ones(len(table), dtype=torch.bool), table.ids
        scores = (query @ keys.T.float()).squeeze(0).masked_fill(~alive, -2.0)
        gold = torch.nonzero(bank_ids == q["fact_id"]).flatten()
        if len(gold) != 1:
            raise SystemExit(f"{data}/qa/{split}.jsonl: fact_id {q['fact_id']} is not in the bank once")
        rank = int((scores > scores[gold[0]]).sum())
        n, top1, top5 = n + 1, top1 + (rank == 0), top5 + (rank < 5)
        by_phrasing.setdefault(f"{q['relation']}/{q['template']}", []).append(rank == 0)
        if rank:
            best = facts[int(bank_ids[scores.argmax()])]
            if best["subject"] != q["subject"]:
                other_person += 1
                shares[_shared(q["subject"], best["subject"])] += 1
                for other in people:
                    if other != q["subject"]:
                        chance[_shared(q["subject"], other)] += 1 / (len(people) - 1)
            else:
                pair = f"{q['relation']} -> {best['relation']}"
                relations[pair] = relations.get(pair, 0) + 1
        if design == "explicitlm":
            _, cand = table.search.search(query, layer.o.fine_k)
            coarse += bool((cand == gold[0]).any())
    out = {"model": model_dir, "data": str(data), "split": split, "phrasing": phrasing, "n": n, "exact_top1": top1 / n,
           "exact_top5": top5 / n, "wrong_top1_other_person": other_person / max(n - top1, 1),
           "other_person_shares": {k: v / max(other_person, 1) for k, v in shares.items()},
           "other_person_shares_by_chance": {k: v / max(other_person, 1) for k, v in chance.items()},
           "same_person_other_relation": dict(sorted(relations.items(), key=lambda kv: -kv[1]))}  # fmt: skip
    if design == "explicitlm":
        out["gold_among_coarse_candidates"] = coarse / n
    out["exact_top1_per_phrasing"] = {k: sum(v) / len(v) for k, v in sorted(by_phrasing.items())}
    if corpus is not None:
        out["tokens_not_in_corpus_per_phrasing"] = unseen_tokens(tok, corpus, questions)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, type=Path, help="benchmark folder (facts.jsonl, qa/SPLIT.jsonl)")
    p.add_argument("--split", default="unseen")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--bank", help="bank folder (default: the model's training bank); bank ids = fact_id")
    p.add_argument("--phrasing", choices=("eval", "train"), default="eval", help="question templates asked")
    p.add_argument(
        "--corpus", type=Path, help="training JSONL: also list the question tokens it never contains"
    )
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    out = measure(args.model, args.data, args.split, args.limit, args.bank, args.phrasing, args.corpus)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
