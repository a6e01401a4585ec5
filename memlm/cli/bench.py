"""``memlm bench``: the speed and memory benchmarks in one run, one JSON.

Runs the scripts of the repository's ``benchmarks/`` folder (each measures its ratios side by side in one
process): every memory design beside dense and RAG (``memory_designs.py``: decoding tokens/s at batch 1 and 16
with its retrieval, training step time, peak RSS), the backbone against transformers' Llama of the same shape
(``backbone.py``), and retrieval latency, recall and bytes per entry by bank size (``bank.py``, one run per
size). Each part's JSON goes to ``--out``/<part>[_<size>].json, and all of them into ``--out``/bench.json.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="speed and memory benchmarks side by side (designs, backbone vs transformers, bank sizes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="benchmarks/results/bench", help="folder for the JSON files")
    p.add_argument(
        "--parts", default="designs,backbone,bank", help="comma-separated: designs, backbone, bank"
    )
    p.add_argument(
        "--bank-sizes",
        default="10000,100000",
        help="entries per bank-size run (add 1000000 for the 1M point)",
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import subprocess
    import sys
    from pathlib import Path

    import memlm
    from memlm.errors import ConfigError

    scripts = Path(memlm.__file__).resolve().parent.parent / "benchmarks"
    if not (scripts / "memory_designs.py").is_file():
        raise ConfigError(f"memlm bench runs the scripts of a source checkout; none at {scripts}")
    parts = [x for x in args.parts.split(",") if x]
    unknown = set(parts) - {"designs", "backbone", "bank"}
    if unknown:
        raise ConfigError(f"--parts: unknown {sorted(unknown)} (designs, backbone, bank)")
    try:
        sizes = [int(x) for x in args.bank_sizes.split(",") if x]
    except ValueError:
        raise ConfigError(f"--bank-sizes: integers separated by commas, got {args.bank_sizes!r}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, list[str]]] = []
    if "designs" in parts:
        runs.append(
            ("designs", ["memory_designs.py", "--device", args.device, "--json", str(out / "designs.json")])
        )
    if "backbone" in parts:
        runs.append(
            ("backbone", ["backbone.py", "--device", args.device, "--json", str(out / "backbone.json")])
        )
    if "bank" in parts:
        for n in sizes:
            name = f"bank_{n}"
            runs.append((name, ["bank.py", "--entries", str(n), "--out", str(out / f"{name}.json")]))
    results = {}
    for name, cmd in runs:
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        subprocess.run([sys.executable, str(scripts / cmd[0]), *cmd[1:]], check=True)
        results[name] = json.loads((out / f"{name}.json").read_text())
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'bench.json'}")
    return 0
