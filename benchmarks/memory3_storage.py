"""Memory³ storage: which tokens a memory keeps, bytes per memory in each format, and what each format costs in EM.

For a trained Memory³ model and its bank:

- kept tokens: every entry with a triple is encoded; per memory layer, the share of entries whose object tokens
  (the answer) all survive in at least one key-value head, in every head, and the mean share of object tokens
  a head keeps (copying the answer needs it in the head that copies);
- bytes: each format's bytes per memory, and the full fp16 key-values of the same references (every layer,
  key-value head and token, as a KV cache would hold them) divided by it;
- EM: QA on a split of a bios benchmark with the memories stored in each format (the retrieval is the same).

    .venv/bin/python benchmarks/memory3_storage.py --model runs/memory3/final --data data/bios \\
        --json benchmarks/results/memory3/storage.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict
from pathlib import Path


def object_span(tokenizer, text: str, obj: str) -> tuple[int, int] | None:
    """Token positions [a, b) of ``obj`` in ``[BOS] + encode(text)``, or None when BPE merges across its edges."""
    at, end = text.rfind(obj), text.rfind(obj) + len(obj)
    if at < 0:
        return None
    if at > 0 and text[at - 1] == " ":  # byte-level BPE: a word's token carries the space before it
        at -= 1
    head, tail = text[:at], text[end:]
    a = tokenizer.encode(head)
    mid = tokenizer.encode(text[at:end])
    if a + mid + tokenizer.encode(tail) != tokenizer.encode(text):
        return None
    return 1 + len(a), 1 + len(a) + len(mid)


def kept_tokens(reader, entries) -> dict:
    import torch

    tok = reader.tokenizer
    spans = [object_span(tok, e.text, e.object) for e in entries]
    rows = [(e, s) for e, s in zip(entries, spans) if s is not None]
    enc = reader.encode([e.text for e, _ in rows])
    layers = reader.layers
    out: dict = {"entries": len(entries), "aligned": len(rows), "layers": {}}
    tokens = [len(reader.reference_ids(e.text)) - 1 for e, _ in rows]
    out["mean_tokens"] = sum(tokens) / len(tokens)
    out["share_tokens_kept_per_head"] = float(enc.n.float().mean() / (sum(tokens) / len(tokens)))
    for j, layer in enumerate(layers):
        some, every, share = 0, 0, 0.0
        rel_some: dict[str, list[bool]] = defaultdict(list)
        for r, (e, (a, b)) in enumerate(rows):
            pos = enc.positions[r, j, :, : int(enc.n[r])]  # (H, n)
            need = torch.arange(a, b)
            per_head = (pos[:, :, None] == need[None, None]).any(1)  # (H, object tokens)
            all_kept = per_head.all(1)  # (H,)
            some += bool(all_kept.any())
            every += bool(all_kept.all())
            share += float(per_head.float().mean())
            rel_some[e.relation].append(bool(all_kept.any()))
        n = len(rows)
        out["layers"][str(layer)] = {
            "object_in_some_head": some / n,
            "object_in_every_head": every / n,
            "object_tokens_kept_per_head": share / n,
            "object_in_some_head_by_relation": {k: sum(v) / len(v) for k, v in sorted(rel_some.items())},
        }
    out["full_fp16_kv_bytes_mean"] = None  # filled by the caller (needs the model config)
    out["tokens"] = tokens
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--bank", default=None, help="default: the bank the model trained with")
    p.add_argument(
        "--data", default=None, help="bios benchmark folder for the EM per format (skipped if absent)"
    )
    p.add_argument("--split", default="unseen")
    p.add_argument("--formats", default="fp32,fp16,int8,pq")
    p.add_argument("--entries", type=int, default=3000, help="entries examined for kept tokens")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from memlm.eval.qa import evaluate_qa, load_qa
    from memlm.generate import Generator
    from memlm.model.checkpoint import load_pretrained
    from memlm.model.memory.binding import open_model_bank
    from memlm.model.memory.memory3_store import full_kv_bytes
    from memlm.model.memory.registry import get_memory_design

    model, tokenizer = load_pretrained(args.model)
    bank = open_model_bank(args.model, "memory3", args.bank)
    cfg = model.config
    design = get_memory_design("memory3")
    reader = design.reader(model, tokenizer, bank)
    entries = [e for e in bank.iter_entries() if e.object][: args.entries]
    result: dict = {"model": args.model, "bank": str(bank.path), "options": cfg.memory_options}
    kept = kept_tokens(reader, entries)
    tokens = kept.pop("tokens")
    full = [full_kv_bytes(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, t) for t in tokens]
    kept["full_fp16_kv_bytes_mean"] = sum(full) / len(full)
    result["kept"] = kept

    records = load_qa(args.data, args.split) if args.data else []
    result["formats"] = {}
    for fmt in args.formats.split(","):
        model.config = copy.deepcopy(cfg)
        model.config.memory_options = {**cfg.memory_options, "storage": fmt}
        r = design.reader(model, tokenizer, bank)
        row: dict = {}
        if records:
            t0 = time.perf_counter()
            report = evaluate_qa(
                Generator(model, tokenizer, reader=r), records, max_new_tokens=args.max_new_tokens
            )
            row.update(em=report.em, retrieval=report.retrieval, seconds=time.perf_counter() - t0)
            row["per_relation"] = {k: v["em"] for k, v in report.per_relation.items()}
        else:
            r.store.get(entries[:8])
        nbytes = r.store.codec.nbytes
        row.update(bytes_per_memory=nbytes, full_fp16_over_this=kept["full_fp16_kv_bytes_mean"] / nbytes)
        result["formats"][fmt] = row
        print(fmt, json.dumps({k: v for k, v in row.items() if k != "per_relation"}))
    model.config = cfg
    print(json.dumps(result["kept"], indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    bank.close()


if __name__ == "__main__":
    main()
