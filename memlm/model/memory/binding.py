"""A model and its bank: which bank a memory model was trained with, and which one it reads now.

A model folder (and a run directory) of a memory design holds ``memory.json``: the design and the bank it was
trained with — its folder, a fingerprint of its content at that time (:meth:`MemoryBank.content_fingerprint`),
its version and size. At inference the model reads that bank by default, or any bank passed explicitly: a bank
with other (edited, grown, swapped) entries is the point of explicit memory, and needs no training. What is
refused, with an error that says why: a memory model with no bank to read (none recorded, or the recorded
folder is gone), a folder that is not a bank, a bank with nothing the model can read, and a bank given to a
model without memory. Never a silent fallback to no memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from memlm.errors import CheckpointError

if TYPE_CHECKING:
    from memlm.bank.store import MemoryBank
    from memlm.model.memory.reader import MemoryReader

MEMORY_FILE = "memory.json"


def bank_record(bank: MemoryBank) -> dict:
    """What a model records of the bank it was trained with."""
    return {
        "path": str(Path(bank.path).resolve()),
        "fingerprint": bank.content_fingerprint(),
        "version": bank.version,
        "entries": bank.count(),
    }


def memory_record(design: str, bank: MemoryBank | None) -> dict:
    return {"design": design, "bank": bank_record(bank) if bank is not None else None}


def write_memory_record(directory: str | os.PathLike, record: dict) -> None:
    """Write ``memory.json`` into a folder being assembled (callers write model folders atomically)."""
    (Path(directory) / MEMORY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_memory_record(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / MEMORY_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from err
    if not isinstance(record, dict) or "design" not in record:
        raise CheckpointError(f"{path}: not a memlm memory record")
    return record


def open_model_bank(
    model_dir: str | os.PathLike | None, design_name: str, bank: str | os.PathLike | MemoryBank | None = None
) -> MemoryBank | None:
    """The bank a model of ``design_name`` (saved in ``model_dir``) reads: ``bank`` or the training bank."""
    from memlm.bank.store import BankError, MemoryBank
    from memlm.model.memory.registry import get_memory_design

    design = get_memory_design(design_name)
    if not design.uses_bank:
        if bank is not None:
            raise BankError(
                f"{model_dir}: this model has no memory that reads a bank (memory: {design_name}); "
                "drop --bank, or use a model trained with a memory design"
            )
        return None
    if isinstance(bank, MemoryBank):
        return bank
    if bank is None:
        record = read_memory_record(model_dir) or {}
        trained = (record.get("bank") or {}).get("path")
        if not trained:
            raise BankError(
                f"{model_dir}: a {design_name} model reads a memory bank but records none it was trained "
                "with; pass --bank DIR (bank=...)"
            )
        if not Path(trained).exists():
            raise BankError(
                f"{model_dir}: trained with the bank {trained}, which no longer exists; pass --bank DIR"
            )
        bank = trained
    return MemoryBank.open(bank)


def load_reader(
    model_dir: str | os.PathLike | None,
    model,
    tokenizer,
    *,
    bank: str | os.PathLike | MemoryBank | None = None,
) -> MemoryReader:
    """The reader of a loaded model, bound to ``bank`` (default: the training bank)."""
    from memlm.bank.store import MemoryBank
    from memlm.model.memory.registry import get_memory_design

    name = model.config.memory
    opened = open_model_bank(model_dir, name, bank)
    try:
        reader = get_memory_design(name).reader(model, tokenizer, opened)
    except BaseException:
        if opened is not None and not isinstance(bank, MemoryBank):
            opened.close()
        raise
    reader.owns_bank = opened is not None and not isinstance(bank, MemoryBank)
    return reader
