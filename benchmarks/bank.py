"""Memory-bank benchmark: ingest, disk, index build, search latency and recall, edit latency, MiniLM encode rate.

Run:  .venv/bin/python benchmarks/bank.py --entries 1000000 --minilm-entries 100000 --threads 2
Small: .venv/bin/python benchmarks/bank.py --entries 20000 --minilm-entries 500

Entries are synthetic biographies (deterministic by --seed); vectors for the index part come from the
hashing encoder (384-d); queries are partial paraphrases of random entries; recall@10 is measured against
exact search. Single-query latency uses 1 FAISS/torch thread per query (how a server would run one
query per core); batched search uses --threads. Results go to stdout and to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

FIRST = [
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Marie",
    "Niels",
    "Emmy",
    "Kurt",
    "Rosalind",
    "Carl",
    "Lise",
    "Paul",
    "Dorothy",
    "Enrico",
    "Barbara",
    "Max",
]
LAST = [
    "Lovelace",
    "Turing",
    "Hopper",
    "Torvalds",
    "Curie",
    "Bohr",
    "Noether",
    "Godel",
    "Franklin",
    "Gauss",
    "Meitner",
    "Dirac",
    "Hodgkin",
    "Fermi",
    "McClintock",
    "Planck",
]
CITIES = [
    "Paris",
    "Lyon",
    "Berlin",
    "Munich",
    "Tokyo",
    "Osaka",
    "Lima",
    "Quito",
    "Oslo",
    "Bergen",
    "Rome",
    "Milan",
    "Cairo",
    "Delhi",
    "Seoul",
    "Busan",
    "Austin",
    "Denver",
]
FIELDS = [
    "physics",
    "chemistry",
    "biology",
    "mathematics",
    "history",
    "music",
    "law",
    "medicine",
    "economics",
    "geology",
    "linguistics",
    "art",
]
EMPLOYERS = [
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Wonka",
    "Cyberdyne",
    "Tyrell",
    "Soylent",
    "Vandelay",
]


def person(i: int, rng: np.random.Generator) -> dict:
    """One synthetic bios fact; the numeric suffix makes 1M unique names."""
    f, la, c, fi, e = (rng.integers(len(x)) for x in (FIRST, LAST, CITIES, FIELDS, EMPLOYERS))
    name = f"{FIRST[f]} {LAST[la]} {i}"
    text = (
        f"{name} was born in {CITIES[c]} in {1900 + int(rng.integers(100))}, studied {FIELDS[fi]} "
        f"and works for {EMPLOYERS[e]}."
    )
    return {"subject": name, "relation": "birth city", "object": CITIES[c], "text": text,
            "namespace": "bios"}  # fmt: skip


def percentiles(ms: list[float]) -> dict:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def edit_latency(bank, retriever, ids: list[int], text) -> dict:
    """Update each entry to ``text(j)`` and time until the next search returns it: p50/p99 ms and the share
    of edits that search found at top-1."""
    lat, ok = [], 0
    for j, eid in enumerate(ids):
        new = text(j)
        t = time.perf_counter()
        bank.update(eid, text=new)
        hit = retriever.search_entries([new], k=1)[0]
        lat.append(1e3 * (time.perf_counter() - t))
        ok += bool(hit) and hit[0].entry.id == eid
    return percentiles(lat) | {"visible_to_next_search": f"{ok}/{len(ids)}"}


def timed_queries(search, queries: np.ndarray, batch: int) -> tuple[dict, np.ndarray]:
    """Latency per call (ms) over the queries in batches of `batch`; returns stats and all ids (Q, 10)."""
    out, lat = [], []
    search(queries[:batch])  # warm-up
    for s in range(0, len(queries), batch):
        t = time.perf_counter()
        _, ids = search(queries[s : s + batch])
        lat.append(1e3 * (time.perf_counter() - t))
        out.append(ids)
    stats = percentiles(lat) | {"batch": batch, "queries_per_s": len(queries) / (sum(lat) / 1e3)}
    return stats, np.concatenate(out)


def recall_at_10(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)]))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument(
        "--minilm-entries", type=int, default=100_000, help="entries encoded with MiniLM (0 = skip)"
    )
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--edits", type=int, default=50, help="single-entry edits timed (update + next search)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", default="exact,flat,ivf,hnsw,pq,pk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where to build the bank (default: a temporary folder, removed)")
    ap.add_argument("--out", default="benchmarks/results/bank.json")
    args = ap.parse_args()

    import faiss
    import torch

    from memlm.bank import MemoryBank, VectorCache
    from memlm.encode import HashingEncoder
    from memlm.index import ExactIndex, FaissIndex, ProductKeyIndex, Retriever

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="memlm-bench-"))
    shutil.rmtree(work / "bank", ignore_errors=True)
    n = args.entries
    res: dict = {
        "entries": n, "threads": args.threads, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "python": sys.version.split()[0], "faiss": faiss.__version__, "torch": torch.__version__,
    }  # fmt: skip
    rng = np.random.default_rng(args.seed)

    # ---------------------------------------------------------------- ingest + encode + disk
    bank = MemoryBank.create(work / "bank")
    t = time.perf_counter()
    bank.add_many((person(i, rng) for i in range(n)), batch_size=10_000, progress=True)
    res["ingest_entries_per_s"] = n / (time.perf_counter() - t)
    res["sqlite_bytes_per_entry"] = dir_bytes(work / "bank") / n
    enc = HashingEncoder(dim=384)
    cache = VectorCache(bank, enc)
    t = time.perf_counter()
    cache.sync(batch_size=8192, progress=True)
    res["hashing_encode_entries_per_s"] = n / (time.perf_counter() - t)
    bank.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    res["disk_bytes_per_entry"] = dir_bytes(work / "bank") / n
    print(json.dumps(res, indent=1), flush=True)

    x = np.empty((n, enc.dim), np.float32)
    ids = np.empty(n, np.int64)
    i = 0
    for bid, bvec, _ in tqdm(cache.iter_all(), desc="load vectors", total=-(-n // 65536)):
        ids[i : i + len(bid)], x[i : i + len(bid)] = bid, bvec
        i += len(bid)
    qrng = np.random.default_rng(args.seed + 1)
    picks = qrng.choice(n, args.queries, replace=False)
    qtexts = [
        " ".join(e.text.split()[:7]) for e in bank.get_many(ids[picks].tolist())
    ]  # "name was born in city in year"
    queries = enc.encode(qtexts)

    # ground truth: exact inner product, chunked over the bank
    gt_s = np.full((len(queries), 10), -np.inf, np.float32)
    gt_i = np.full((len(queries), 10), -1, np.int64)
    qt = torch.from_numpy(queries)
    for s in tqdm(range(0, n, 200_000), desc="exact ground truth"):
        sc = (qt @ torch.from_numpy(x[s : s + 200_000]).T).numpy()
        allsc = np.concatenate([gt_s, sc], 1)
        allid = np.concatenate([gt_i, np.broadcast_to(ids[s : s + 200_000], sc.shape)], 1)
        top = np.argsort(-allsc, 1)[:, :10]
        gt_s, gt_i = np.take_along_axis(allsc, top, 1), np.take_along_axis(allid, top, 1)

    # ---------------------------------------------------------------- indexes
    # nlist ~ 2 sqrt(n): ~500 vectors per list; training k-means on 100k points stays a minute on 2 cores
    nlist = 2 ** round(np.log2(2 * np.sqrt(n)))
    makers = {
        "exact": (lambda: ExactIndex(dim=enc.dim), [{}]),
        "flat": (lambda: FaissIndex(dim=enc.dim, spec="Flat"), [{}]),
        "ivf": (lambda: FaissIndex(dim=enc.dim, spec=f"IVF{nlist},Flat"), [{"nprobe": p} for p in (16, 64, 128)]),
        "hnsw": (lambda: FaissIndex(dim=enc.dim, spec="HNSW32", ef_construction=40),
                 [{"ef_search": e} for e in (64, 128, 256)]),
        "pq": (lambda: FaissIndex(dim=enc.dim, spec=f"IVF{nlist // 2},PQ48"), [{"nprobe": p} for p in (16, 64)]),
        "pk": (lambda: ProductKeyIndex(dim=enc.dim), [{"topk_half": 32, "n_cells": 256}, {"topk_half": 64, "n_cells": 1024}]),
    }  # fmt: skip
    res["indexes"] = {}
    keep = None
    for kind in args.kinds.split(","):
        make, settings = makers[kind]
        index = make()
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
        t = time.perf_counter()
        index.add(ids, x)
        build = time.perf_counter() - t
        index.save(work / f"index-{kind}")
        size = dir_bytes(work / f"index-{kind}")
        shutil.rmtree(work / f"index-{kind}")
        rows = []
        for setting in settings:
            if setting:
                index.set_search_params(**setting)
            # brute force over 1M is ~0.1 s per query: 128 queries are enough for its latency
            nq = len(queries) if kind not in ("exact", "flat") else min(len(queries), 2 * args.batch)
            faiss.omp_set_num_threads(1)
            torch.set_num_threads(1)
            single, got = timed_queries(lambda q: index.search(q, 10), queries[:nq], 1)  # noqa: B023
            faiss.omp_set_num_threads(args.threads)
            torch.set_num_threads(args.threads)
            batched, _ = timed_queries(lambda q: index.search(q, 10), queries[:nq], args.batch)  # noqa: B023
            row = {
                "setting": setting,
                "recall@10": recall_at_10(got, gt_i[:nq]),
                "single": single,
                "batched": batched,
            }
            rows.append(row)
            print(kind, json.dumps(row), flush=True)
        res["indexes"][kind] = {"build_s": build, "index_bytes_per_entry": size / n, "spec": getattr(index, "spec", kind),
                                "results": rows}  # fmt: skip
        print(kind, f"build {build:.1f} s, {size / n:.0f} bytes/entry", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))  # partial results survive a later failure
        if kind == "ivf":
            keep = index  # the one the edit benchmark runs on
        else:
            del index

    # ---------------------------------------------------------------- edit latency (update one entry, next search sees it)
    if keep is not None:
        best = next(
            (r["setting"] for r in res["indexes"]["ivf"]["results"] if r["recall@10"] >= 0.95), {"nprobe": 64}
        )
        keep.set_search_params(**best)
        keep.meta = {"bank_version": bank.version, "fingerprint": enc.fingerprint, "kind": "faiss"}
        retriever = Retriever(bank, enc, keep)
        faiss.omp_set_num_threads(1)
        edited = qrng.choice(ids, args.edits, replace=False).tolist()
        text = lambda j: f"Edited person {j} now lives on the moon base Tranquility {j}."  # noqa: E731
        res["edit"] = edit_latency(bank, retriever, edited, text) | {"index": "ivf", "setting": best}
        print("edit", json.dumps(res["edit"]), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        del keep, retriever
    bank.close()
    del x

    # ---------------------------------------------------------------- MiniLM encode rate
    if args.minilm_entries:
        from memlm.encode.minilm import MiniLMEncoder

        torch.set_num_threads(args.threads)
        m = MiniLMEncoder(batch_size=256)
        mb = MemoryBank.create(work / "bank-minilm")
        mrng = np.random.default_rng(args.seed)
        mb.add_many(person(i, mrng) for i in range(args.minilm_entries))
        t = time.perf_counter()
        VectorCache(mb, m).sync(batch_size=4096, progress=True)
        res["minilm_encode_entries_per_s"] = args.minilm_entries / (time.perf_counter() - t)
        res["minilm_entries"] = args.minilm_entries
        mb.close()

    print(json.dumps(res, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
