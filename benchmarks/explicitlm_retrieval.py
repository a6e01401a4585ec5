"""ExplicitLM's per-token retrieval cost at 10k, 100k and 1M entries (random entries), in one run.

For each size: a table of random token-sequence entries, their keys encoded by an untrained ExplicitLM entry
encoder, the product-key sub-keys fit on them; then one memory layer (eval mode) retrieves and reads for a
batch of token positions. Reported per token: the coarse search alone (:meth:`ProductKeySearch.search`), the
whole layer (query, coarse search, fine stage with fresh keys, read), and an exact search over every key for
reference (what the coarse stage avoids), plus the coarse stage's recall@1 against the exact search for
queries near a random entry's key, the sub-keys per half (K) and candidates per token.

    .venv/bin/python benchmarks/explicitlm_retrieval.py --json benchmarks/results/explicitlm/retrieval_cpu.json

The per-token cost of the coarse stage grows with sqrt(N) (K sub-keys per half), the rest is constant in N;
the exact search grows with N.

With ``query_encoder`` a prompt's question also searches once per text (not per token) by the encoder's
vectors (:class:`memlm.model.memory.row_index.RowIndex`): ``--text`` times that search per question at the
same sizes on random 384-d unit vectors (MiniLM's width), exact torch against ``text_index: auto`` (FAISS
IVF from 50,000 entries on), with recall@1 against exact for questions near a random entry's vector::

    .venv/bin/python benchmarks/explicitlm_retrieval.py --text --json benchmarks/results/explicitlm/text_search_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(n_entries: int, args) -> dict:
    import torch
    import torch.nn.functional as F

    from memlm.model import GPT, ModelConfig
    from memlm.model.memory import MemoryContext
    from memlm.model.memory.explicitlm import EntryTable, ExplicitInputs

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=2048, n_layer=4, n_head=4, n_embd=args.n_embd, block_size=256, memory="explicitlm",
        memory_layers=[2], memory_options={"key_dim": args.key_dim},
    )  # fmt: skip
    model = GPT(cfg).eval()
    o = model.blocks[2].cross.o
    table = EntryTable(n_implicit=0, o=o, pad_id=0)
    g = torch.Generator().manual_seed(1)
    rows = torch.arange(n_entries)
    key_tokens = torch.randint(8, 2048, (n_entries, 10), generator=g)
    text_tokens = torch.randint(8, 2048, (n_entries, 16), generator=g)
    table.set_rows(
        rows, rows, F.pad(key_tokens, (0, o.key_tokens - 10)), F.pad(text_tokens, (0, o.text_tokens - 16)),
        torch.ones(n_entries, dtype=torch.bool),
    )  # fmt: skip
    t0 = time.perf_counter()
    with torch.no_grad():
        keys = table.encode_keys(model.memory, model.wte)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table.search.fit(keys, table.alive)
    fit_s = time.perf_counter() - t0
    table.key_step = 0
    search = table.search

    n = args.tokens
    pick = torch.randint(0, n_entries, (n,), generator=g)
    q = F.normalize(keys[pick] + args.noise * torch.randn(n, o.key_dim, generator=g) / o.key_dim**0.5, dim=1)
    h = torch.randn(1, n, args.n_embd, generator=g)
    layer = model.blocks[2].cross
    memory = MemoryContext(inputs=ExplicitInputs(table=table, embed=model.wte))
    with torch.no_grad():
        coarse_s = _time(lambda: search.search(q, o.fine_k), args.repeats)
        layer_s = _time(lambda: layer(h, memory), args.repeats)
        m = min(n, args.exact_tokens)
        exact_s = _time(lambda: search.exact(q[:m], o.fine_k), 1) * n / m
        _, approx = search.search(q[:m], 1)
        _, exact = search.exact(q[:m], 1)
    return {
        "entries": n_entries,
        "sub_keys_per_half": search.n_keys,
        "candidates_per_token": int(search.candidates(q[:1]).shape[1]),
        "unreachable_entries": search.unreachable,
        "recall_at_1": float((approx[:, 0] == exact[:, 0]).float().mean()),
        "coarse_us_per_token": 1e6 * coarse_s / n,
        "layer_us_per_token": 1e6 * layer_s / n,
        "exact_us_per_token": 1e6 * exact_s / n,
        "encode_keys_s": encode_s,
        "fit_s": fit_s,
    }


def measure_text(n_entries: int, args) -> dict:
    import torch
    import torch.nn.functional as F

    from memlm.model.memory.row_index import RowIndex

    g = torch.Generator().manual_seed(1)
    vectors = F.normalize(torch.randn(n_entries, args.text_dim, generator=g), dim=1)
    pick = torch.randint(0, n_entries, (args.questions,), generator=g)
    noise = args.noise * torch.randn(args.questions, args.text_dim, generator=g) / args.text_dim**0.5
    q = F.normalize(vectors[pick] + noise, dim=1)
    out = {"entries": n_entries}
    found = {}
    for index in ("exact", "auto"):
        t0 = time.perf_counter()
        t = RowIndex(args.text_dim, index=index)
        t.set(torch.arange(n_entries), vectors)
        out[f"{index}_build_s"] = time.perf_counter() - t0
        out[f"{index}_us_per_question"] = (
            1e6 * _time(lambda t=t: t.search(q, 8), args.repeats) / args.questions
        )
        found[index] = t.search(q, 1)[1][:, 0]
        if index == "auto":
            shard = next(iter(t._faiss.shards.values())) if t.uses_faiss else None
            out["auto_index"] = shard.built_spec if shard is not None else "exact"
        del t
    out["auto_recall_at_1"] = float((found["auto"] == found["exact"]).float().mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--tokens", type=int, default=2048, help="token positions retrieved in one batch")
    p.add_argument("--exact-tokens", type=int, default=256, help="positions timed for the exact reference")
    p.add_argument("--noise", type=float, default=0.3, help="query = entry key + this much Gaussian noise")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--key-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--text", action="store_true", help="time the question's search (query_encoder) instead")
    p.add_argument("--questions", type=int, default=256, help="--text: questions searched in one batch")
    p.add_argument(
        "--text-dim", type=int, default=384, help="--text: the query encoder's width (MiniLM: 384)"
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.text:
        rows = [measure_text(int(s), args) for s in args.sizes.split(",")]
        print(
            "| entries | exact µs/question | auto µs/question | auto index | auto recall@1 | auto build s |"
        )
        print("| ---: | ---: | ---: | --- | ---: | ---: |")
        for r in rows:
            print(
                f"| {r['entries']:,} | {r['exact_us_per_question']:.0f} | {r['auto_us_per_question']:.0f} "
                f"| {r['auto_index']} | {r['auto_recall_at_1']:.3f} | {r['auto_build_s']:.1f} |"
            )
        _write(args, rows)
        return
    rows = [measure(int(s), args) for s in args.sizes.split(",")]
    print(
        "| entries | K per half | candidates/token | recall@1 | coarse µs/token | layer µs/token | exact µs/token |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['entries']:,} | {r['sub_keys_per_half']} | {r['candidates_per_token']} | {r['recall_at_1']:.3f} "
            f"| {r['coarse_us_per_token']:.1f} | {r['layer_us_per_token']:.1f} | {r['exact_us_per_token']:.1f} |"
        )
    _write(args, rows)


def _write(args, rows: list[dict]) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        result = {
            "config": vars(args),
            "rows": rows,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "cpus": os.cpu_count(),
            },
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
