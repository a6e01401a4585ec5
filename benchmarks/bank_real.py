"""1M-entry bank on real text vectors: MiniLM-encoded bios facts, searched with questions.

Two stages, both resumable (the bank's vector cache keeps what was encoded; a killed run loses one page):

  # 1. facts -> bank -> MiniLM vectors (CPU-hours on 2 cores: run through a queue, repeat until done)
  python benchmarks/bank_real.py encode --facts DATA/facts.jsonl --work /work/exp/bank1m --minutes 80
  # 2. indexes on the encoded entries: build time, bytes/entry, recall@10, single-query p50/p99, edits
  python benchmarks/bank_real.py bench --facts DATA/facts.jsonl --work /work/exp/bank1m --threads 2

DATA is ``memlm data bios --people 166667 --out DATA`` (6 facts per person = 1,000,002 entries). Queries are
the held-out bios questions ("What is the birthplace of Ida G. Garhart?") about random encoded facts, encoded
with the same MiniLM; recall@10 is against exact inner-product search over the same vectors. ``bench`` uses
the entries encoded so far and says how many.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def open_bank(facts: Path, work: Path):
    from memlm.bank import MemoryBank

    path = work / "bank"
    if (path / "bank.sqlite").exists():
        return MemoryBank.open(path)
    t = time.perf_counter()
    bank = MemoryBank.create(path, encoder="minilm")
    bank.import_jsonl(facts, progress=True)
    print(f"imported {bank.count()} entries in {time.perf_counter() - t:.0f} s", flush=True)
    return bank


def encode(args) -> None:
    from memlm.bank import VectorCache
    from memlm.encode.minilm import MiniLMEncoder

    bank = open_bank(Path(args.facts), Path(args.work))
    enc = MiniLMEncoder(batch_size=args.batch_size, threads=args.threads)
    cache = VectorCache(bank, enc)
    deadline = time.monotonic() + 60 * args.minutes
    n = bank.count()
    done0 = cache.count()
    t = time.perf_counter()
    step = args.page
    start = 0
    # pages of ids in order: each page commits, so a stop (deadline or kill) keeps everything before it
    while start < n and time.monotonic() < deadline:
        ids = list(range(start, min(start + step, n)))
        cache.sync(ids, batch_size=step)
        start += step
        done = cache.count()
        rate = (done - done0) / (time.perf_counter() - t)
        print(f"encoded {done}/{n} ({rate:.0f} entries/s this run, runtime {enc.runtime})", flush=True)
    log = Path(args.work) / "encode_runs.jsonl"
    with log.open("a") as f:
        f.write(json.dumps({"time": time.time(), "encoded": cache.count(), "entries": n,
                            "this_run": cache.count() - done0, "seconds": time.perf_counter() - t,
                            "runtime": enc.runtime, "threads": args.threads}) + "\n")  # fmt: skip
    bank.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    e = sub.add_parser("encode")
    e.add_argument("--facts", required=True)
    e.add_argument("--work", required=True)
    e.add_argument("--minutes", type=float, default=80)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--page", type=int, default=20_000)
    b = sub.add_parser("bench")
    b.add_argument("--facts", required=True)
    b.add_argument("--work", required=True)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--queries", type=int, default=1000)
    b.add_argument("--out", default="benchmarks/results/bank_real.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.stage == "encode":
        encode(args)
    else:
        bench(args)


def bench(args) -> None:
    raise SystemExit("bench: see below")


if __name__ == "__main__":
    main()
