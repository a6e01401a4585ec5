"""The index kinds, how a saved index folder is opened, and how purge and verify reach saved indexes.

A saved index is a derived store of the bank (memlm.bank.derived): importing this module registers each
kind, so ``MemoryBank.delete(..., purge=True)`` rewrites every saved index without the purged entries (HNSW
graphs are rebuilt, so not even a tombstoned vector stays in the file) and ``MemoryBank.verify`` checks them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from memlm.bank import derived
from memlm.index.base import INDEX_FORMAT_VERSION, IndexFileError, ShardedIndex
from memlm.index.exact import ExactIndex
from memlm.index.faiss_index import FaissIndex
from memlm.index.product_keys import ProductKeyIndex

if TYPE_CHECKING:
    from memlm.bank.store import MemoryBank

KINDS: dict[str, type[ShardedIndex]] = {"exact": ExactIndex, "faiss": FaissIndex, "pk": ProductKeyIndex}


def load_index(path: str | os.PathLike) -> ShardedIndex:
    """Load any saved index folder (the manifest names its kind); corrupt files raise IndexFileError."""
    path = Path(path)
    mf = path / "manifest.json"
    try:
        manifest = json.loads(mf.read_text())
        kind, fmt = manifest["kind"], manifest["format_version"]
    except FileNotFoundError:
        raise IndexFileError(f"{path}: not an index folder (no manifest.json)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise IndexFileError(f"{mf}: corrupt manifest ({e})") from None
    if fmt > INDEX_FORMAT_VERSION:
        raise IndexFileError(f"{mf}: written by a newer memlm (index format {fmt} > {INDEX_FORMAT_VERSION})")
    if kind not in KINDS:
        raise IndexFileError(f"{mf}: unknown index kind {kind!r} (known: {', '.join(KINDS)})")
    index = KINDS[kind]._from_manifest(manifest)
    index.meta = manifest.get("meta", {})
    for ns, sub in manifest["shards"].items():
        try:
            index.shards[ns] = index._load_shard(path / sub)
        except IndexFileError:
            raise
        except Exception as e:  # faiss/safetensors raise assorted types on a damaged file
            raise IndexFileError(f"{path / sub}: corrupt index shard ({type(e).__name__}: {e})") from None
    return index


def drop_from_saved(path: Path, ids: np.ndarray) -> None:
    """Purge handler: load, remove ``ids``, drop them physically, write the folder again atomically."""
    index = load_index(path)
    index.remove(ids)
    for shard in index.shards.values():
        if hasattr(shard, "compact"):
            shard.compact()
    index.save(path)


def verify_saved(bank: MemoryBank, path: Path) -> list[str]:
    """The index loads, and if it claims to be current its ids equal the entries with current vectors."""
    try:
        index = load_index(path)
    except IndexFileError as e:
        return [str(e)]
    meta = index.meta
    if meta.get("bank_version") != bank.version:
        return []  # stale is fine: it is refreshed from the log on next use
    expect = np.array(
        [r[0] for r in bank.connection.execute(
            "SELECT e.id FROM entries e JOIN vectors v ON v.entry_id=e.id "
            "WHERE v.fingerprint=? AND v.content_hash=e.content_hash ORDER BY e.id", (meta.get("fingerprint"),))],
        np.int64,
    )  # fmt: skip
    got = index.ids()
    if np.array_equal(got, expect):
        return []
    extra = np.setdiff1d(got, expect)
    return [
        f"{path}: index holds {len(got)} ids, bank has {len(expect)} current vectors"
        + (f"; e.g. id {extra[0]} is not (or no longer) in the bank" if len(extra) else "")
    ]


for _kind in KINDS:
    derived.register(_kind, drop=drop_from_saved, verify=verify_saved)
