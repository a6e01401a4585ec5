"""``memlm bank``: create, fill, edit, inspect, search and check a memory bank from the shell."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("bank", help="create, edit, search and check a memory bank",
                              description="Create, edit, search and check a memory bank (a folder; see docs/bank.md).")  # fmt: skip
    sub = p.add_subparsers(dest="bank_command", required=True, metavar="ACTION")

    def cmd(name: str, helptext: str, func) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=helptext, description=helptext)
        sp.add_argument("bank", help="bank folder")
        sp.set_defaults(func=func)
        return sp

    sp = cmd("create", "create an empty bank", _create)
    sp.add_argument(
        "--encoder", default="hashing", help="default encoder for search: hashing | hashing:DIM | minilm"
    )

    sp = cmd("import", "import a facts JSONL file (one transaction: a bad line imports nothing)", _import)
    sp.add_argument(
        "file", help='JSONL, one {"text": ..., "subject", "relation", "object", "namespace", ...} per line'
    )
    sp.add_argument("--namespace", help="namespace for lines that name none")
    sp.add_argument("--create", action="store_true", help="create the bank if it does not exist")

    sp = cmd("export", "export entries as JSONL (with ids)", _export)
    sp.add_argument("file")
    sp.add_argument("--namespace", action="append", help="only these namespaces (repeatable)")

    sp = cmd("add", "add one entry; prints its id", _add)
    _content_args(sp)

    sp = cmd("edit", "change fields of one entry", _edit)
    sp.add_argument("id", type=int)
    _content_args(sp)

    sp = cmd("delete", "delete entries", _delete)
    sp.add_argument("ids", type=int, nargs="+")
    sp.add_argument(
        "--purge", action="store_true",
        help="erase for good (right to be forgotten): history, rollback, vectors, indexes and every file byte",
    )  # fmt: skip

    sp = cmd("show", "print entries as JSON", _show)
    sp.add_argument("ids", type=int, nargs="+")

    sp = cmd("search", "search entries by text; prints score, id, namespace, text", _search)
    sp.add_argument("query", nargs="+", help="query text(s)")
    sp.add_argument("-k", type=int, default=5)
    sp.add_argument("--namespace", action="append", help="only these namespaces (repeatable)")
    sp.add_argument(
        "--index", default="exact", choices=["exact", "faiss", "pk"], help="index kind (saved in the bank)"
    )
    sp.add_argument("--encoder", help="encoder spec (default: the bank's)")

    sp = cmd(
        "lookup", "LMLM lookup: (subject, relation) -> entry by exact key, alias, then fuzzy match", _lookup
    )
    sp.add_argument("subject")
    sp.add_argument("relation")
    sp.add_argument("--namespace", action="append")
    sp.add_argument("--threshold", type=float, default=0.8)

    sp = cmd("history", "the versions of one entry", _history)
    sp.add_argument("id", type=int)

    sp = cmd("rollback", "return the bank to an earlier version (as a new, undoable version)", _rollback)
    sp.add_argument("version", type=int)

    cmd("verify", "check database, vectors and indexes against each other (exit 1 on problems)", _verify)
    cmd("checkpoint", "finish an erasure a reader had blocked (exit 1 while still blocked)", _checkpoint)
    cmd("stats", "counts and sizes as JSON", _stats)


def _content_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--text")
    sp.add_argument("--subject")
    sp.add_argument("--relation")
    sp.add_argument("--object")
    sp.add_argument("--namespace")
    sp.add_argument("--source")
    sp.add_argument(
        "--alias", action="append", dest="aliases", help="another name of the subject (repeatable)"
    )
    sp.add_argument("--frozen", action=argparse.BooleanOptionalAction, default=None)


def _fields(args) -> dict:
    keys = ("text", "subject", "relation", "object", "namespace", "source", "aliases", "frozen")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _open(args, **kw):
    from memlm.bank import MemoryBank

    return MemoryBank.open(args.bank, **kw)


def _create(args) -> None:
    from memlm.bank import MemoryBank
    from memlm.encode import load_encoder

    if args.encoder != "minilm":  # validate the spec now, not at the first search (MiniLM is slow to load)
        load_encoder(args.encoder)
    MemoryBank.create(args.bank, encoder=args.encoder).close()
    print(f"created {args.bank}")


def _import(args) -> None:
    import shutil
    from pathlib import Path

    from memlm.bank import MemoryBank

    path = Path(args.bank)
    create = args.create and not (path / "bank.sqlite").exists()
    existed = path.exists()
    if create:
        MemoryBank.create(path).close()
    try:
        with _open(args) as bank:
            ids = bank.import_jsonl(args.file, namespace=args.namespace, progress=sys.stderr.isatty())
            print(f"imported {len(ids)} entries into {args.bank} (version {bank.version})")
    except BaseException:
        if create:  # a refused import leaves no trace: not even the empty bank it was to fill
            if existed:
                for child in path.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
        raise


def _export(args) -> None:
    with _open(args, readonly=True) as bank:
        n = bank.export_jsonl(args.file, namespaces=args.namespace)
    print(f"exported {n} entries to {args.file}")


def _add(args) -> None:
    with _open(args) as bank:
        print(bank.add(**_fields(args)))


def _edit(args) -> None:
    fields = _fields(args)
    if not fields:
        from memlm.errors import InputError

        raise InputError("nothing to change (give --text, --object, ...)")
    with _open(args) as bank:
        e = bank.update(args.id, **fields)
        print(json.dumps(e.to_dict(), ensure_ascii=False))


def _delete(args) -> None:
    if args.purge:
        import memlm.index  # noqa: F401  (registers saved indexes, so purge rewrites them instead of deleting)
    with _open(args) as bank:
        n = bank.delete(args.ids, purge=args.purge)
        pending = bank.erasure_pending
    if not args.purge:
        print(f"deleted {n} entries (reversible: history and rollback keep them; --purge erases for good)")
    elif pending:
        print(f"purged {n} entries; erasure pending: another process is reading {args.bank}, so the old text "
              "stays in bank.sqlite-wal until that reader closes the bank (it then completes the erasure)")  # fmt: skip
    else:
        print(f"purged {n} entries: their text is gone from every file of {args.bank}")


def _show(args) -> None:
    with _open(args, readonly=True) as bank:
        for e in bank.get_many(args.ids):
            print(json.dumps(e.to_dict(), ensure_ascii=False))


def _search(args) -> None:
    from memlm.encode import load_encoder
    from memlm.index import Retriever

    with _open(args) as bank:
        encoder = load_encoder(args.encoder or bank.default_encoder)
        retriever = Retriever.open_or_build(bank, encoder, kind=args.index, progress=sys.stderr.isatty())
        hits = retriever.search_entries(args.query, k=args.k, namespaces=args.namespace)
        if retriever.dirty:
            retriever.save(retriever.name)  # keep the refreshed index for the next call
    for q, row in zip(args.query, hits):
        if len(args.query) > 1:
            print(f"# {q}")
        for h in row:
            print(f"{h.score:.4f}\t{h.entry.id}\t{h.entry.namespace}\t{h.entry.text}")


def _lookup(args) -> None:
    from memlm.encode import load_encoder
    from memlm.index import LexicalIndex

    with _open(args) as bank:
        lex = LexicalIndex(bank, load_encoder(bank.default_encoder), threshold=args.threshold)
        hit = lex.lookup(args.subject, args.relation, namespaces=args.namespace)
    if hit is None:
        print("unknown")
    else:
        print(f"{hit.how}\t{hit.score:.4f}\t{hit.entry.id}\t{hit.entry.object}\t{hit.entry.text}")


def _history(args) -> None:
    with _open(args, readonly=True) as bank:
        for r in bank.history(args.id):
            state = "(deleted)" if r.entry is None else json.dumps(r.entry, ensure_ascii=False)
            print(f"v{r.version}\t{r.op}\t{state}")


def _rollback(args) -> None:
    with _open(args) as bank:
        n = bank.rollback(args.version)
        print(f"rolled back to version {args.version}: {n} entries changed (now version {bank.version})")


def _checkpoint(args) -> int:
    with _open(args) as bank:
        done = bank.finish_erasure(wait_s=5.0)
    print("no erasure pending" if done else "still blocked by a reader; run again when it has finished")
    return 0 if done else 1


def _verify(args) -> int:
    import memlm.index  # noqa: F401  (registers the saved-index checks)

    with _open(args, readonly=True) as bank:
        problems = bank.verify(progress=sys.stderr.isatty())
    for p in problems:
        print(p)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def _stats(args) -> None:
    with _open(args, readonly=True) as bank:
        print(json.dumps(bank.stats(), indent=2, ensure_ascii=False))
