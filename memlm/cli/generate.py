"""``memlm generate``: text from a trained model folder, printed or streamed, optionally as JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memlm.cli import add_memory_option
from memlm.errors import InputError
from memlm.utils.jsonl import iter_jsonl


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a trained model",
        description="Generate from a model folder (model.safetensors, config.json, tokenizer.json).",
    )
    p.add_argument(
        "--model", required=True, type=Path, help="model folder, e.g. runs/demo/runs/bios/rag/train/final"
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    p.add_argument(
        "--prompts-file",
        type=Path,
        help="one prompt per line (.txt), or JSONL whose objects have a 'prompt' field (e.g. a qa/*.jsonl file)",
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable), e.g. '\\n'")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--stream", action="store_true", help="print tokens as they are decoded (one prompt)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt (text, tokens, trace)")
    p.add_argument(
        "--bank", default=None, help="bank folder a memory model reads (default: its training bank)"
    )
    p.add_argument(
        "--sources", action="store_true", help="print under each answer the bank entries it used (id, text)"
    )
    p.add_argument("--device", default="cpu")
    add_memory_option(p)
    p.set_defaults(func=run)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    path = args.prompts_file
    if path and path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            if not isinstance(obj.get("prompt"), str):
                raise InputError("expected a string", path=path, line=lineno, field="prompt")
            prompts.append(obj["prompt"])
    elif path:
        try:
            prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read prompts ({err})", path=path) from err
    prompts = prompts[: args.limit] if args.limit is not None else prompts
    if not prompts:
        raise InputError("give at least one --prompt or a --prompts-file")
    return prompts


def run(args: argparse.Namespace) -> int:
    from memlm.generate import Generator

    prompts = _prompts(args)
    stops = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]  # a shell passes '\n' literally
    options = dict(args.memory_options)
    with Generator.from_pretrained(
        args.model, device=args.device, bank=args.bank, memory_options=options
    ) as gen:
        return _generate(gen, prompts, stops, args)


def _generate(gen, prompts: list[str], stops: list[str], args: argparse.Namespace) -> int:
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.stream:
        if len(prompts) != 1:
            raise InputError("--stream takes exactly one prompt")
        sys.stdout.write(prompts[0])
        for piece in gen.stream(prompts[0], max_new_tokens=args.max_new_tokens, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    outs = gen.generate(
        prompts, max_new_tokens=args.max_new_tokens, stop=stops, batch_size=args.batch_size, **sampling
    )
    for o in outs:
        if args.json:
            print(json.dumps({"prompt": o.prompt, "text": o.text, "finish_reason": o.finish_reason,
                              "token_ids": o.token_ids, "retrieved": o.retrieved, "trace": o.trace},
                             ensure_ascii=False))  # fmt: skip
        else:
            print(f"{o.prompt}{o.text}")
        if args.sources and not args.json:
            _print_sources(gen, o)
    return 0


def _print_sources(gen, o) -> None:
    """The entries an answer used, as the bank holds them now (an entry deleted since is marked)."""
    if o.retrieved is None:
        print("  sources: none (this model reads no memory)")
        return
    bank = gen.reader.bank
    entries = bank.get_many(o.retrieved, missing_ok=True) if o.retrieved else []
    print(f"  sources ({len(o.retrieved)}):")
    for i, e in zip(o.retrieved, entries):
        print(f"    [{i}] {e.text if e is not None else '(deleted since)'}")
    for event in o.trace:
        if event.get("kind") not in (None, "retrieve", "read"):  # lookups etc.: shown as recorded
            print(f"    {event}")
