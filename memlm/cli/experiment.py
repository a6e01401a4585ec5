"""``memlm experiment``: every design on the same data and budget, resumable, with a report and plots."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="compare every memory design on the same data and budget (resumable; report + plots)",
        description=__doc__ + " Re-running the same command continues a killed experiment; finished cells "
        "(data, banks, trainings, evaluations) are never redone.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="experiment YAML (see configs/experiment/)")
    p.add_argument(
        "--cells-from",
        metavar="RESULTS_JSON",
        help="first copy in the evaluated cells of an earlier run's results.json (e.g. a committed report) that "
        "this config would train the same way: they are not trained again",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run, overrides=[])


def run(args) -> int:
    from memlm.experiment import Experiment, load_experiment

    cfg = load_experiment(args.config, args.overrides)
    experiment = Experiment(cfg, progress=not args.quiet)
    if args.cells_from:
        experiment.import_cells(args.cells_from)
    experiment.run()
    print(f"results: {cfg.out_dir}/results.json, report: {cfg.out_dir}/report.md")
    return 0
