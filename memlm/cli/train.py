"""``memlm train``: train a model from a YAML config, with dotted ``--key value`` overrides.

Data-parallel: ``torchrun --nproc_per_node N -m memlm.cli train --config ...`` (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import argparse

EPILOG = """\
overrides: any config field as --section.field value, typed by the config dataclasses, e.g.
  memlm train --config configs/tiny.yaml --train.lr 3e-4 --model.n_layer 2 --out_dir runs/t2
run directory: config.yaml, run.json (git commit, versions), metrics.jsonl,
  checkpoints/step_XXXXXXX/, final/ (a model folder for `memlm generate`)
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (single process or under torchrun)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # overrides=[]: the dispatcher hands unknown --section.field options here; the config dataclasses check them.
    p.set_defaults(func=run, overrides=[])


def run(args: argparse.Namespace) -> int:
    from memlm.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0

    from memlm.train import Trainer

    result = Trainer(cfg).fit(resume=args.resume)
    if result.get("loss") is not None:
        val = f", val_loss {result['val_loss']:.4f}" if result.get("val_loss") is not None else ""
        print(f"step {result['step']}: loss {result['loss']:.4f}{val}; model in {cfg.out_dir}/final")
    return 0
