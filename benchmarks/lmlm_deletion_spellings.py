"""Deleted facts through near-duplicate spellings: does any LMLM lookup still return a deleted value?

For every fact of ``DATA/deletions.jsonl``, on a copy of the model's bank: look the fact up under near-duplicate
spellings of its subject (case, spacing, a dropped full stop, a dropped or doubled letter, a missing initial,
"Last, First M.") before and after the deletion, both as the model would write the call (``entity`` as
spelt) and inside a question that names the subject with that spelling (``entity: context`` reads it there).
A lookup leaks when it answers the deleted value from the deleted entry or from the same person's other
entries. Another person who happens to share the value is not a leak (the entry read is reported)::

    python benchmarks/lmlm_deletion_spellings.py --model RUN/final --data /work/exp/bios2k --json out.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def spellings(name: str) -> dict[str, str]:
    words = name.split()
    first, last = words[0], words[-1]
    middle = " ".join(words[1:-1])
    out = {
        "exact": name,
        "upper": name.upper(),
        "spacing": f"  {name.lower()} ",
        "no_full_stop": name.replace(".", ""),
        "dropped_letter": f"{first} {middle} {last[:-1]}".replace("  ", " "),
        "doubled_letter": f"{first} {middle} {last}{last[-1]}".replace("  ", " "),
        "no_initial": f"{first} {last}",
        "last_first": f"{last}, {first} {middle}".strip(),
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--limit", type=int)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    from memlm.eval.update import bank_copy, entry_ids_by_key
    from memlm.generate import Generator
    from memlm.model.checkpoint import read_config
    from memlm.model.memory.binding import open_model_bank
    from memlm.tokenizer import DB_ENTITY, DB_RELATIONSHIP, DB_RETURN

    path = args.data / "deletions.jsonl"
    deletions = [json.loads(x) for x in path.read_text().splitlines()][: args.limit]
    source = open_model_bank(args.model, read_config(args.model).memory, None)
    src = source.path
    source.close()
    counts: dict[str, Counter] = {}
    with bank_copy(src) as copy:
        gen = Generator.from_pretrained(args.model, bank=copy)
        reader, tok = gen.reader, gen.tokenizer

        def ask(fact, spelt, in_question):
            call = f"{DB_ENTITY} {spelt}{DB_RELATIONSHIP} {fact['relation']}{DB_RETURN}"
            text = f"Q: What about {spelt}?\nA:{call}" if in_question else call
            return reader.lookup(*reader._read_call(tok.encode(text, bos=True)))

        ids = entry_ids_by_key(copy, deletions, path=path)
        gone = set(ids)
        for when in ("before", "after"):
            if when == "after":
                copy.delete(ids)
                reader.refresh()
            for fact in deletions:
                for kind, spelt in spellings(fact["subject"]).items():
                    for where in ("call", "question"):
                        a = ask(fact, spelt, where == "question")
                        c = counts.setdefault(f"{when}/{where}/{kind}", Counter())
                        c["n"] += 1
                        read = (
                            copy.get_many([a.entry_id], missing_ok=True)[0]
                            if a.entry_id is not None
                            else None
                        )
                        same = read is not None and read.subject == fact["subject"]
                        if a.value == fact["object"] and (a.entry_id in gone or same or a.entry_id is None):
                            c["answered"] += 1
                        c["deleted_entry_read"] += a.entry_id in gone
        gen.close()
    keys = ("n", "answered", "deleted_entry_read")
    rows = {k: {**{x: v[x] for x in keys}, "rate": v["answered"] / v["n"]} for k, v in sorted(counts.items())}
    after = [v for k, v in rows.items() if k.startswith("after/")]
    summary = {
        "model": str(args.model),
        "deletions": len(deletions),
        "leak": sum(v["answered"] for v in after) / sum(v["n"] for v in after),
        "deleted_entries_read_after": sum(v["deleted_entry_read"] for v in after),
        "rows": rows,
    }
    print("| when / where / spelling | n | deleted value answered |\n| --- | ---: | ---: |")
    for k, v in rows.items():
        print(f"| {k} | {v['n']} | {v['rate']:.3f} |")
    print(
        f"leak after deletion: {summary['leak']:.4f}; deleted entries read: {summary['deleted_entries_read_after']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
