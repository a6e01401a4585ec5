"""Generation time and peak memory of `memlm data bios` at 10k, 100k and 1M people.

Run: .venv/bin/python benchmarks/data_gen.py [--sizes 10000,100000,1000000] [--workers 2]

Each size runs `memlm data bios` in a fresh process. Peak memory is sampled from /proc every 0.1 s as the
summed resident set of the process and its workers (Linux), and also reported as the largest single
process's peak (ru_maxrss, the largest so far). CPU seconds (user + system, workers included) are given
next to wall time because a shared machine's load inflates the wall time. Output size is measured, then the folder is removed. Writes a JSON and a
markdown table next to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _tree_rss_bytes(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants, from /proc (0 where /proc is missing)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(d.name)] = int(fields[1])
            rss[int(d.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += [c for c, p in parents.items() if p == pid]
    return total


def run_one(people: int, workers: int, root: Path) -> dict:
    out = root / f"bios_{people}"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from memlm.cli import main; sys.exit(main())",
        "data",
        "bios",
        "--people",
        str(people),
        "--out",
        str(out),
    ]
    cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_bytes(proc.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)  # includes the pool's workers
    if proc.returncode:
        raise SystemExit(f"memlm data bios failed: {proc.stderr.read().decode()[-2000:]}")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    lines = json.loads((out / "meta.json").read_text())["lines"]
    shutil.rmtree(out)
    return {
        "people": people,
        "workers": workers,
        "seconds": round(seconds, 1),
        "people_per_second": round(people / seconds),
        "cpu_seconds": round(cpu, 1),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "peak_rss_tree_mib": round(peak / 2**20),
        "output_gib": round(size / 2**30, 3),
        "facts": lines["facts.jsonl"],
        "corpus_docs_train": lines["corpus/train.jsonl"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tmp", default=None, help="folder for the generated data (default: system temp)")
    parser.add_argument("--out", default="benchmarks/results/data_gen.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            row = run_one(n, args.workers, Path(tmp))
            row["max_single_process_rss_mib"] = round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    env = {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    cols = ["people", "workers", "seconds", "cpu_seconds", "load_avg_1min_after", "people_per_second"]
    cols += ["peak_rss_tree_mib", "max_single_process_rss_mib", "output_gib", "facts"]
    table = ["| " + " | ".join(cols) + " |", "|" + " ---: |" * len(cols)]
    table += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
