"""``memlm data bios|geo|ingest``: build knowledge benchmarks and import a user's facts or documents."""

from __future__ import annotations

import argparse
import json

from memlm.errors import InputError


def _percentages(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _benchmark_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seen-fraction", type=float, default=0.5, help="share of entities in corpus/train")
    p.add_argument(
        "--low-data", type=_percentages, default=(1, 10, 100), help="low-data corpora, in %% of entities"
    )
    p.add_argument("--edit-share", type=float, default=0.1, help="share of facts in the edit set")
    p.add_argument("--delete-share", type=float, default=0.05, help="share of facts in the deletion set")
    p.add_argument("--docs-per-entity", type=int, default=2, help="descriptions per covered entity")
    p.add_argument("--no-qa-docs", action="store_true", help="leave the QA drills out of the corpora")
    p.add_argument("--no-lmlm", action="store_true", help="do not write the *_lmlm corpora")


def _benchmark_config(args, namespace: str):
    from memlm.data.benchmark import BenchmarkConfig

    try:
        return BenchmarkConfig(
            seed=args.seed,
            seen_fraction=args.seen_fraction,
            low_data=args.low_data,
            edit_share=args.edit_share,
            delete_share=args.delete_share,
            docs_per_entity=args.docs_per_entity,
            qa_docs=not args.no_qa_docs,
            lmlm=not args.no_lmlm,
            namespace=namespace,
        )
    except ValueError as err:
        raise InputError(str(err)) from None


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="build benchmarks (bios, geo) or ingest your own data")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="SOURCE")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    bios = sub.add_parser("bios", help="synthetic biographies (1k-1M people)", formatter_class=fmt)
    bios.add_argument("--people", type=int, default=1000)
    bios.add_argument("--workers", type=int, default=2, help="processes (output does not depend on it)")
    _benchmark_args(bios)
    bios.set_defaults(func=run_bios)

    geo = sub.add_parser("geo", help="real facts about countries and cities (GeoNames)", formatter_class=fmt)
    geo.add_argument(
        "--min-population",
        type=int,
        default=15000,
        choices=(500, 1000, 5000, 15000),
        help="smallest city kept",
    )
    geo.add_argument("--max-cities", type=int, default=None, help="keep only the N most populous cities")
    _benchmark_args(geo)
    geo.set_defaults(func=run_geo)

    ing = sub.add_parser(
        "ingest",
        help="your JSONL facts/triples or text/markdown files -> facts.jsonl",
        formatter_class=fmt,
        description="JSONL lines are facts {subject, relation, object[, text, ...]}; .txt/.md files are "
        "chunked into entries. Any bad input fails naming file, line and field, and writes nothing.",
    )
    ing.add_argument("inputs", nargs="+", help=".jsonl, .txt or .md files (or folders holding them)")
    ing.add_argument("--out", required=True, help="output folder")
    ing.add_argument("--chunk-size", type=int, default=512, help="characters per text chunk")
    ing.add_argument("--overlap", type=int, default=64, help="characters shared by consecutive chunks")
    ing.add_argument("--namespace", default="default")
    ing.set_defaults(func=run_ingest)


def _report(meta: dict, out) -> None:
    lines = meta.get("lines", {})
    print(json.dumps({"out": str(out), **lines}, indent=2))


def run_bios(args) -> int:
    from memlm.data.bios import BiosConfig, generate_bios

    try:
        bios = BiosConfig(people=args.people, seed=args.seed, workers=args.workers)
    except ValueError as err:
        raise InputError(str(err), field="people") from None
    meta = generate_bios(args.out, bios, _benchmark_config(args, "bios"))
    _report(meta, args.out)
    return 0


def run_geo(args) -> int:
    from memlm.data.geo import GeoConfig, generate_geo

    meta = generate_geo(
        args.out,
        GeoConfig(min_population=args.min_population, max_cities=args.max_cities),
        _benchmark_config(args, "geo"),
    )
    _report(meta, args.out)
    return 0


def run_ingest(args) -> int:
    from memlm.data.ingest import IngestConfig, ingest

    try:
        config = IngestConfig(chunk_size=args.chunk_size, overlap=args.overlap, namespace=args.namespace)
    except ValueError as err:
        raise InputError(str(err)) from None
    meta = ingest(args.inputs, args.out, config)
    print(json.dumps({"out": str(args.out), **meta["counts"]}, indent=2))
    return 0
