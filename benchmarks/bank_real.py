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
    log = Path(args.work) / "encode_runs.jsonl"
    run = {"started": time.time(), "entries": n, "runtime": enc.runtime, "threads": args.threads}
    # pages of ids in order: each page commits, so a stop (deadline or kill) keeps everything before it
    while start < n and time.monotonic() < deadline:
        ids = list(range(start, min(start + step, n)))
        cache.sync(ids, batch_size=step)
        start += step
        done = cache.count()
        secs = time.perf_counter() - t
        print(
            f"encoded {done}/{n} ({(done - done0) / secs:.0f} entries/s this run, runtime {enc.runtime})",
            flush=True,
        )
        # one line per page (the last one of a run is its summary), so even a killed run leaves its record
        with log.open("a") as f:
            f.write(json.dumps(run | {"encoded": done, "this_run": done - done0, "seconds": secs}) + "\n")
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
    b.add_argument("--edits", type=int, default=100)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--hnsw", default="32:80", help="M:efConstruction, comma-separated")
    b.add_argument("--pq-m", type=int, default=48)
    b.add_argument("--rerank", type=int, default=10, help="IVF-PQ candidates per result re-scored exactly")
    b.add_argument("--no-ivf", action="store_true", help="HNSW configurations only")
    b.add_argument("--no-edits", action="store_true", help="skip the edit-latency and rebuild measurements")
    b.add_argument("--out", default="benchmarks/results/bank_real.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.stage == "encode":
        encode(args)
    else:
        bench(args)


def load_questions(facts: Path, ids: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """n (fact id, held-out question) pairs about random encoded entries (entry id = fact line index)."""
    rng = np.random.default_rng(seed)
    want = set(rng.choice(ids, 4 * n, replace=False).tolist())
    pairs: dict[int, str] = {}
    for name in ("unseen", "seen"):
        with (facts.parent / "qa" / f"{name}.jsonl").open() as f:
            for line in f:
                r = json.loads(line)
                if r["fact_id"] in want and r["fact_id"] not in pairs:
                    pairs[r["fact_id"]] = r["question"]
    keys = sorted(pairs)[: 4 * n]
    pick = rng.permutation(len(keys))[:n]
    return np.array([keys[i] for i in pick], np.int64), [pairs[keys[i]] for i in pick]


def exact_topk(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int = 10) -> np.ndarray:
    import torch

    best_s = torch.full((len(q), k), -np.inf)
    best_i = torch.full((len(q), k), -1, dtype=torch.int64)
    qt, idt = torch.from_numpy(q), torch.from_numpy(ids)
    for s in range(0, len(x), 200_000):
        sc = qt @ torch.from_numpy(x[s : s + 200_000]).T
        alls = torch.cat([best_s, sc], 1)
        alli = torch.cat([best_i, idt[s : s + 200_000].expand(len(q), -1)], 1)
        best_s, pos = alls.topk(k, dim=1)
        best_i = alli.gather(1, pos)
    return best_i.numpy()


def timed_single(search, queries: np.ndarray) -> tuple[dict, np.ndarray]:
    """One query per call: wall-clock and CPU-time percentiles (ms), and all ids (Q, 10).

    CPU time is what the query cost this process; on a machine shared with other jobs the wall time also
    holds the time the scheduler gave to them, so both are reported, with the load average beside them."""
    search(queries[:1])  # warm-up
    wall, cpu, out = [], [], []
    for q in queries:
        t, c = time.perf_counter(), time.process_time()
        _, ids = search(q[None])
        cpu.append(1e3 * (time.process_time() - c))
        wall.append(1e3 * (time.perf_counter() - t))
        out.append(ids)
    stats = {"p50_ms": float(np.percentile(wall, 50)), "p99_ms": float(np.percentile(wall, 99)),
             "cpu_p50_ms": float(np.percentile(cpu, 50)), "cpu_p99_ms": float(np.percentile(cpu, 99)),
             "load_avg_1min": os.getloadavg()[0]}  # fmt: skip
    return stats, np.concatenate(out)


def bench(args) -> None:
    import faiss
    import torch

    from memlm.bank import VectorCache
    from memlm.encode.minilm import MiniLMEncoder
    from memlm.index import FaissIndex

    sys.path.insert(0, str(Path(__file__).parent))
    from bank import dir_bytes, recall_at_10

    faiss.omp_set_num_threads(args.threads)
    work = Path(args.work)
    bank = open_bank(Path(args.facts), work)
    enc = MiniLMEncoder(threads=args.threads)
    cache = VectorCache(bank, enc)
    n = cache.count()
    runs = work / "encode_runs.jsonl"
    res: dict = {
        "entries_in_bank": bank.count(), "entries_encoded": n, "threads": args.threads,
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "faiss": faiss.__version__, "torch": torch.__version__, "encoder": enc.fingerprint,
        "encode_runs": [json.loads(s) for s in runs.read_text().splitlines()] if runs.exists() else [],
    }  # fmt: skip
    x = np.empty((n, enc.dim), np.float32)
    ids = np.empty(n, np.int64)
    i = 0
    for bid, bvec, _ in cache.iter_all():
        m = min(len(bid), n - i)
        ids[i : i + m], x[i : i + m] = bid[:m], bvec[:m]
        i += m
    x, ids = x[:i], ids[:i]
    qids, questions = load_questions(Path(args.facts), ids, args.queries, args.seed)
    queries = enc.encode(questions)
    gt = exact_topk(x, ids, queries)
    res["query_fact_in_exact_top10"] = float(np.mean([q in g for q, g in zip(qids, gt)]))
    print(json.dumps(res, indent=1), flush=True)
    out = Path(args.out)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))

    # ~4 sqrt(n) lists, but never more than FAISS can train from n vectors (39 per centroid)
    nlist = 2 ** int(np.log2(min(4 * np.sqrt(len(x)), len(x) / 39)))
    efs = (16, 32, 48, 64, 96, 128, 192, 256)
    configs = [
        (f"HNSW{m}", {"ef_construction": int(efc)}, [{"ef_search": e} for e in efs])
        for m, efc in (s.split(":") for s in args.hnsw.split(","))
    ]
    if not args.no_ivf:
        nprobes = (16, 32, 64, 128, 256)
        configs.append(
            (f"IVF{nlist},PQ{args.pq_m}", {"rerank": args.rerank}, [{"nprobe": p} for p in nprobes])
        )
    res["indexes"] = []
    for n_config, (spec, build_params, settings) in enumerate(configs):
        index = FaissIndex(dim=enc.dim, spec=spec, **build_params)
        faiss.omp_set_num_threads(args.threads)
        t = time.perf_counter()
        index.add(ids, x, replace=False)
        build = time.perf_counter() - t
        index.save(work / "index-tmp")
        size = dir_bytes(work / "index-tmp")
        import shutil

        shutil.rmtree(work / "index-tmp")
        built = sorted({sh.built_spec for sh in index.shards.values()})
        row = {"spec": spec, "built_spec": built, "build": build_params, "build_s": build,
               "index_bytes_per_entry": size / len(x),
               "results": []}  # fmt: skip
        for setting in settings:
            index.set_search_params(**setting)
            faiss.omp_set_num_threads(1)  # one query per core, as a server runs them
            single, got = timed_single(lambda q, index=index: index.search(q, 10), queries)
            r = {"setting": setting, "recall@10": recall_at_10(got, gt), "single": single}
            row["results"].append(r)
            print(spec, json.dumps(r), flush=True)
        res["indexes"].append(row)
        save()
        if (
            n_config == 0 and not args.no_edits
        ):  # the first (HNSW) index, then dropped: edits and rebuilds before the next
            edits(args, res, bank, enc, index, ids, row)
            save()
        del index


def edits(args, res: dict, bank, enc, index, ids: np.ndarray, row: dict) -> None:
    """Edit latency on an HNSW index (update one entry, the next search must return it), and the cost of its
    rebuild once a quarter of the entries are removed."""
    import faiss

    from memlm.index import Retriever

    sys.path.insert(0, str(Path(__file__).parent))
    from bank import edit_latency

    faiss.omp_set_num_threads(args.threads)
    best = next(
        (r["setting"] for r in row["results"] if r["recall@10"] >= 0.95), row["results"][-1]["setting"]
    )
    index.set_search_params(**best)
    index.meta = {"bank_version": bank.version, "fingerprint": enc.fingerprint, "kind": "faiss"}
    retriever = Retriever(bank, enc, index)
    rng = np.random.default_rng(args.seed + 2)
    run = int(time.time())  # texts unique to this run: an earlier run's edits stay in the bank
    text = lambda j: f"Edit {j} of run {run}: this person now lives on the moon base Tranquility {j}."  # noqa: E731
    edited = rng.choice(ids, args.edits, replace=False).tolist()
    res["edit"] = edit_latency(bank, retriever, edited, text) | {"index": row["spec"], "setting": best}
    shard = next(iter(index.shards.values()))
    # the rebuild's copy of the live vectors: one reconstruct_n call vs the old Python loop per slot
    live = np.flatnonzero(shard._alive[: shard._n])
    t = time.perf_counter()
    np.vstack([shard.index.reconstruct(int(s)) for s in live])
    loop_s = time.perf_counter() - t
    t = time.perf_counter()
    shard.index.reconstruct_n(0, shard._n)[live]
    res["hnsw_copy_live_vectors"] = {"rows": len(live), "per_slot_loop_s": loop_s,
                                     "reconstruct_n_s": time.perf_counter() - t}  # fmt: skip
    t = time.perf_counter()
    shard.remove(ids[: len(ids) // 4 + 1])  # past a quarter dead: the vectorised rebuild runs
    res["hnsw_rebuild_after_quarter_deleted_s"] = time.perf_counter() - t
    print("edit", json.dumps(res["edit"]), res["hnsw_rebuild_after_quarter_deleted_s"], flush=True)

    bank.close()


if __name__ == "__main__":
    main()
