"""``memlm demo``: dense vs a memory model on a small bios benchmark; answers with sources, an edit, a deletion."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from memlm.demo import DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="the memory story end to end in minutes on a CPU (what `make demo` runs)",
        description=__doc__ + " Re-running reuses the trained models (and resumes a killed run).",
    )
    p.add_argument("--out", default=d.out_dir, help=f"run directory (default {d.out_dir})")
    p.add_argument("--people", type=int, default=d.people, help=f"bios people (default {d.people})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps per model (default {d.steps})")
    p.add_argument(
        "--design", default=d.design, help=f"memory design shown beside dense (default {d.design})"
    )
    p.add_argument("--questions", type=int, default=d.questions, help="questions evaluated per split")
    p.add_argument("--seed", type=int, default=d.seed, help="data seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memlm.demo import DemoConfig, run_demo
    from memlm.errors import ConfigError

    for name in ("people", "steps", "questions"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1")
    cfg = DemoConfig(out_dir=args.out, people=args.people, steps=args.steps, design=args.design,
                     questions=args.questions, seed=args.seed)  # fmt: skip
    run_demo(cfg)
    return 0
