"""The ``memlm`` console script.

Every module in this package that defines ``register(subparsers)`` adds one subcommand; its handler
is stored with ``set_defaults(func=...)`` and imports heavy libraries only when it runs, so
``memlm --help`` is instant. A subcommand that sets ``set_defaults(overrides=[])`` also receives the
options argparse does not know (dotted config overrides such as ``--train.lr 3e-4``) in ``args.overrides``;
any other subcommand rejects them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from memlm import __version__
from memlm.errors import MemlmError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memlm",
        description="Language models with explicit, editable memory.",
    )
    parser.add_argument("--version", action="version", version=f"memlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        if getattr(args, "overrides", None) is None:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = extras
    try:
        return int(args.func(args) or 0)
    except MemlmError as err:
        print(f"memlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `memlm ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"memlm {args.command}: interrupted", file=sys.stderr)
        return 130


def add_memory_option(p: argparse.ArgumentParser) -> None:
    """``--memory-option KEY=VALUE`` (repeatable) -> ``args.memory_options``: a dict that overrides the model's
    recorded ``memory_options`` for this reading (``Generator.from_pretrained(memory_options=...)``)."""
    p.add_argument(
        "--memory-option", dest="memory_options", action="append", type=_key_value, default=[],
        metavar="KEY=VALUE",
        help="override one of the model's memory_options when reading, e.g. read_top_n=5 (PlugLM); repeatable",
    )  # fmt: skip


def _key_value(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)  # 1 -> int, 0.5 -> float, true -> bool, else the string
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{key}: cannot parse {value!r} ({err})") from err


if __name__ == "__main__":
    sys.exit(main())
