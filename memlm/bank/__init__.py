"""The memory bank: the editable source of truth for every memory design (see docs/bank.md).

>>> bank = MemoryBank.create("my.bank")
>>> i = bank.add(subject="Paris", relation="capital of", object="France", text="Paris is the capital of France.")
>>> bank.update(i, text="Paris is the capital city of France."); bank.delete(i); bank.rollback(1)
"""

from memlm.bank import derived
from memlm.bank.artifacts import ArtifactStore
from memlm.bank.entry import DEFAULT_NAMESPACE, Entry, normalise
from memlm.bank.records import read_jsonl, validate
from memlm.bank.store import BankError, MemoryBank, Revision, UnknownEntryError
from memlm.bank.vectors import VectorCache

__all__ = [
    "DEFAULT_NAMESPACE", "ArtifactStore", "BankError", "Entry", "MemoryBank", "Revision", "UnknownEntryError", "VectorCache",
    "derived", "normalise", "read_jsonl", "validate",
]  # fmt: skip
