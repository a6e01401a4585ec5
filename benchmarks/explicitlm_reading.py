"""What ExplicitLM's fusion reads at the answer's first position: does it copy the value's first token?

For each question, one forward pass over the prompt; at its last position (the one that predicts the answer's
first token) it records which entry the layer read, whether the greedy next token is the answer's first token,
and where the cross-attention's weight goes inside the read entry (mean over heads): the null slot, the value's
first token, its other tokens, the token right after it (the "." that ends a fact), or the rest (subject,
relation words). Counted where the read entry is the gold one, so a wrong first token is the reading's fault::

    python benchmarks/explicitlm_reading.py --model RUN/final --data runs/experiment-cpu/data/bios \\
        --phrasing train --limit 600 --json benchmarks/results/explicitlm/.../reading.json
"""

from __future__ import annotations

import argparse
import json
import math
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import memlm.model.memory.explicitlm as explicitlm
from memlm.eval.qa import load_qa, rephrase
from memlm.model.checkpoint import load_pretrained
from memlm.model.memory.binding import load_reader

PARTS = ("null", "value_first", "value_rest", "after_value", "other")


def _capture(seen: dict) -> None:
    """Record the fusion's attention weights and the rows it read (the module's own functions, wrapped)."""
    sdpa = F.scaled_dot_product_attention

    def attention(q, k, v, attn_mask=None):
        w = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~attn_mask, float("-inf"))
        seen["weights"] = w.softmax(-1)  # (n, H, 1, 1 + kL)
        return sdpa(q, k, v, attn_mask=attn_mask)

    explicitlm.F = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("_")})
    explicitlm.F.scaled_dot_product_attention = attention
    read = explicitlm.ExplicitLMLayer._read

    def recording(self, x, rows, *args):
        seen["rows"] = rows
        return read(self, x, rows, *args)

    explicitlm.ExplicitLMLayer._read = recording


def _span(tokens: list[int], value: list[int]) -> int | None:
    return next((i for i in range(len(tokens) - len(value) + 1) if tokens[i : i + len(value)] == value), None)


@torch.no_grad()
def measure(model_dir: str, data: Path, split: str, limit: int, phrasing: str) -> dict:
    model, tok = load_pretrained(model_dir)
    if model.config.memory != "explicitlm":
        raise SystemExit(f"{model_dir} is a {model.config.memory!r} model, not explicitlm")
    model.eval()
    reader = load_reader(model_dir, model, tok)
    seen: dict = {}
    _capture(seen)
    records = rephrase(load_qa(data, split)[:limit], data, phrasing)
    out: dict[str, dict] = {}
    for r in records:
        batch = reader.prompts([r.prompt])
        logits = model(torch.tensor(batch.token_ids), memory=batch.memory).logits[0, -1]
        row = int(seen["rows"][-1, 0])
        stats = out.setdefault(
            r.relation, {"n": 0, "gold_read": 0, "first_token_right": 0, **dict.fromkeys(PARTS, 0.0)}
        )
        stats["n"] += 1
        if row < 0 or int(reader.table.ids[row]) != r.fact_id:
            continue
        stats["gold_read"] += 1
        stats["first_token_right"] += int(logits.argmax()) == tok.encode(" " + r.answer)[0]
        tokens = [t for t in reader.table.text_tokens[row].tolist() if t != tok.pad_id]
        value = tok.encode(" " + r.answer)
        at = _span(tokens, value)
        w = seen["weights"][-1, :, 0].mean(0)  # (1 + L,): null slot first
        share = dict.fromkeys(PARTS, 0.0)
        share["null"] = float(w[0])
        for i, x in enumerate(w[1 : 1 + len(tokens)].tolist()):
            if at is not None and i == at:
                share["value_first"] += x
            elif at is not None and at < i < at + len(value):
                share["value_rest"] += x
            elif at is not None and i == at + len(value):
                share["after_value"] += x
            else:
                share["other"] += x
        for k in PARTS:
            stats[k] += share[k]
    total = {"n": 0, "gold_read": 0, "first_token_right": 0, **dict.fromkeys(PARTS, 0.0)}
    for stats in out.values():
        for k in total:
            total[k] += stats[k]
    result = {"model": model_dir, "data": str(data), "split": split, "phrasing": phrasing}
    for name, stats in [("all", total), *sorted(out.items())]:
        g = max(stats["gold_read"], 1)
        result[name] = {
            "n": stats["n"],
            "gold_read_at_first_position": stats["gold_read"] / stats["n"],
            "first_token_right_given_gold_read": stats["first_token_right"] / g,
            "attention_given_gold_read": {k: stats[k] / g for k in PARTS},
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, type=Path, help="benchmark folder (meta.json, qa/SPLIT.jsonl)")
    p.add_argument("--split", default="unseen")
    p.add_argument("--limit", type=int, default=600)
    p.add_argument("--phrasing", choices=("eval", "train"), default="train")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    out = measure(args.model, args.data, args.split, args.limit, args.phrasing)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
