"""Tokenized documents -> one packed token stream on disk, read back as fixed-length training windows.

Layout of a packed folder (written atomically: a crash leaves the old folder or none, never half of one)::

    tokens.bin   token ids, uint16 when the vocabulary has < 65536 ids, else uint32
    mask.bin     uint8, 1 = this token may be a target, 0 = never a target (e.g. LMLM's looked-up values)
    meta.json    n_tokens, dtype, tokenizer fingerprint, the source files with size + mtime, and a tag

Documents are packed as ``BOS doc EOS``: EOS is a target (the model learns where documents end); BOS is
never a target but starts every document, exactly as :class:`memlm.generate.Generator` starts a prompt.
``meta.json`` is the cache key: :func:`build_packed` rebuilds when a source file, the tokenizer or the tag
(annotation mode, split) changed, and reuses the folder otherwise.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from memlm.data.text import iter_corpus
from memlm.errors import InputError
from memlm.utils.io import atomic_path, write_json

FORMAT = 2  # bump when the on-disk layout changes: old caches are then rebuilt
IGNORE_INDEX = -100  # target value that cross-entropy skips (torch's default ignore_index)

# A document is its token ids, or (ids, loss_mask) as memlm.data.annotate.annotate_ids returns.
Doc = Sequence[int] | tuple[Sequence[int], Sequence[bool]]
Annotator = Callable[..., tuple[Sequence[int], Sequence[bool]]]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def pack_documents(
    docs: Iterable[Doc],
    out_dir: str | os.PathLike,
    *,
    eos_id: int,
    vocab_size: int,
    bos_id: int | None = None,
    meta: dict | None = None,
) -> dict:
    """Stream ``docs`` into ``out_dir`` (tokens.bin, mask.bin, meta.json); returns the meta dict.

    Memory use is one document at a time, so corpora larger than RAM pack fine.
    """
    dtype = token_dtype(vocab_size)
    n_tokens = n_docs = 0
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        with open(tmp / "tokens.bin", "wb") as ftok, open(tmp / "mask.bin", "wb") as fmask:
            for doc in docs:
                ids, mask = _split_doc(doc)
                if len(ids) != len(mask):
                    raise InputError(f"document {n_docs}: {len(ids)} token ids but {len(mask)} mask values")
                head = [] if bos_id is None else [bos_id]
                ids = np.asarray([*head, *ids, eos_id], dtype=np.int64)
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise InputError(f"document {n_docs}: token id outside [0, {vocab_size})")
                ftok.write(ids.astype(dtype).tobytes())
                fmask.write(np.asarray([*(False for _ in head), *mask, True], dtype=np.uint8).tobytes())
                n_tokens += ids.size
                n_docs += 1
        info = {
            **(meta or {}),
            "format": FORMAT,
            "n_tokens": n_tokens,
            "n_docs": n_docs,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
        }
        write_json(tmp / "meta.json", info)
    return info


def _split_doc(doc: Doc) -> tuple[Sequence[int], Sequence[bool]]:
    if isinstance(doc, tuple) and len(doc) == 2 and not isinstance(doc[0], int):
        return doc[0], doc[1]
    return doc, [True] * len(doc)


def in_val_split(text: str, val_fraction: float) -> bool:
    """Deterministic, content-based split: the same document lands in the same split on every run and
    machine, and duplicates never straddle train and val."""
    return zlib.crc32(text.encode("utf-8")) % 1_000_000 < val_fraction * 1_000_000


def source_signature(files: Iterable[str | os.PathLike]) -> list[dict]:
    """Path, size and mtime of each source file: enough to notice an edited file without hashing it."""
    sig = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise InputError("file not found", path=p)
        st = p.stat()
        sig.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return sig


def build_packed(
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer,
    *,
    annotate: Annotator | None = None,
    select: Callable[[str], bool] | None = None,
    tag: str = "",
    progress: bool = True,
) -> Path:
    """Tokenize ``files`` (.txt / .jsonl, see :mod:`memlm.data.text`) into a packed folder, unless an
    up-to-date one is already there.

    ``annotate(tokenizer, text) -> (ids, loss_mask)`` replaces plain encoding (LMLM annotation);
    ``select(text)`` keeps only some documents (a train/val split); ``tag`` names both in the cache key.
    """
    out_dir = Path(out_dir)
    key = {
        "format": FORMAT,
        "tokenizer": tokenizer.fingerprint(),
        "sources": source_signature(files),
        "tag": tag,
    }
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if all(old.get(k) == v for k, v in key.items()):
            return out_dir

    texts: Iterable[str] = iter_corpus(files)
    if select is not None:
        texts = filter(select, texts)
    if progress:
        from tqdm import tqdm

        texts = tqdm(texts, desc=f"tokenizing {out_dir.name}", unit=" docs", mininterval=0.5)
    if annotate is not None:
        docs: Iterable[Doc] = (annotate(tokenizer, t) for t in texts)
    else:
        docs = _encode_batched(tokenizer, texts)
    pack_documents(
        docs,
        out_dir,
        eos_id=tokenizer.eos_id,
        bos_id=tokenizer.bos_id,
        vocab_size=tokenizer.vocab_size,
        meta=key,
    )
    return out_dir


def _encode_batched(tokenizer, texts: Iterable[str], batch: int = 512) -> Iterator[list[int]]:
    """Encode in batches: the Rust tokenizer is much faster on a batch than on one string at a time."""
    buf: list[str] = []
    for text in texts:
        buf.append(text)
        if len(buf) == batch:
            yield from tokenizer.encode_batch(buf)
            buf = []
    if buf:
        yield from tokenizer.encode_batch(buf)


class PackedDataset(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len`` tokens over a packed folder.

    Item ``i`` is ``(input_ids, targets)``, both LongTensor ``(seq_len,)``: ``input_ids = tokens[i*L : i*L+L]``
    and ``targets = tokens[i*L+1 : i*L+L+1]`` (already shifted), with ``-100`` wherever the target token's
    mask is 0. Windows cut documents anywhere; the mask travels with each token, so a cut never unmasks one.
    The memmaps open lazily, so a dataset pickled into DataLoader workers does not copy the data.
    """

    def __init__(self, directory: str | os.PathLike, seq_len: int) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise InputError("not a packed data folder (meta.json missing)", path=self.directory)
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.seq_len = seq_len
        self.n_tokens = int(self.meta["n_tokens"])
        self.n_seq = (self.n_tokens - 1) // seq_len
        if self.n_seq < 1:
            raise InputError(
                f"{self.n_tokens} tokens is too few for one window of seq_len={seq_len}", path=self.directory
            )
        self._tokens: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n_seq

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.directory / "tokens.bin", dtype=self.meta["dtype"], mode="r")
        return self._tokens

    @property
    def mask(self) -> np.ndarray:
        if self._mask is None:
            self._mask = np.memmap(self.directory / "mask.bin", dtype=np.uint8, mode="r")
        return self._mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n_seq:
            raise IndexError(i)
        start, L = i * self.seq_len, self.seq_len
        window = torch.from_numpy(self.tokens[start : start + L + 1].astype(np.int64))
        keep = torch.from_numpy(self.mask[start + 1 : start + L + 1].astype(np.bool_))
        targets = window[1:].masked_fill(~keep, IGNORE_INDEX)
        return window[:-1], targets

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None, "_mask": None}
