"""Where Memory³'s explicit memories live between uses: packed rows in the bank folder, decoded ones in an LRU.

A memory is a derived artifact of one bank entry *and* one checkpoint (Memory³, Remark 9: new weights make
every old memory meaningless). They are stored through the bank's :class:`~memlm.bank.vectors.VectorCache`,
one fixed-size row per entry under a fingerprint made of the weights' hash, the tokenizer and the encoding
settings, and the entry's content hash:

- an edited entry's row is dropped by the bank in the edit's transaction and re-encoded on its next read;
- a deleted entry's row is unmapped and overwritten with zeros by the bank's delete (every fingerprint's file),
  and :meth:`MemoryStore.refresh` evicts it from the LRU: no cache of this module can hand it out again;
- other weights (a new checkpoint, or these weights changed in place) have another fingerprint, so none of the
  old rows are read: the memories are rebuilt, or, with ``on_stale="error"``, :class:`StaleMemoryError` says
  which checkpoint built the memories in the bank and which one asks.

Formats (``storage``), bytes per memory for L memory layers, H key-value heads, ``keep`` tokens, head dim D:

| format | what is stored | bytes |
| --- | --- | --- |
| fp32 | keys and values as float32 (the exact reference) | 4 + 8 L H keep D |
| fp16 | as float16 | 4 + 4 L H keep D |
| int8 | int8 with one fp16 scale per channel (layer, K/V, head, dim) of the memory: error <= scale / 2 | 4 + 2 L H keep D + 4 L H D |
| pq | FAISS product quantisation: ``pq_m`` one-byte codes per head vector, one codebook per (layer, K/V) | 4 + 2 L H keep pq_m |

The 4 bytes are the number of kept tokens (a reference shorter than ``keep`` fills fewer slots). A row's bytes
are stored in the cache's float32 words unchanged (``pack`` and ``unpack`` view them; nothing computes on them).
The PQ codebooks are trained once per checkpoint on the memories of up to ``pq_train`` entries and saved in the
bank's ``vectors/`` folder; their hash is part of the fingerprint.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from memlm.errors import MemlmError

if TYPE_CHECKING:
    from memlm.bank.entry import Entry
    from memlm.bank.store import MemoryBank

FORMATS = ("fp32", "fp16", "int8", "pq")
PREFIX = "memory3|"  # every Memory³ fingerprint starts so (how a stale checkpoint's memories are recognised)


class StaleMemoryError(MemlmError):
    """The bank's memories were built by other weights than the model's (Memory³, Remark 9)."""


@dataclass
class Encoded:
    """Sparse memories of R references: ``k``, ``v`` (R, L, H, keep, D); ``n`` (R,) filled slots (the first
    ``n`` of ``keep``, in every layer and head); ``positions`` (R, L, H, keep): which reference token each slot
    holds (encoding only, for measurements)."""

    k: Tensor
    v: Tensor
    n: Tensor
    positions: Tensor | None = None

    def to(self, device: torch.device | str) -> Encoded:
        return Encoded(self.k.to(device), self.v.to(device), self.n.to(device), self.positions)


# ---- formats -----------------------------------------------------------------------------------------


class Codec:
    """Packs memories of shape (L, H, keep, D) into fixed-size byte rows, and back. Base class: a float dtype."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: type = np.float16) -> None:
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.spec = self.dtype.name.replace("float", "fp")

    @property
    def values(self) -> int:
        """Numbers in one memory: keys and values of every layer, head, slot and dim."""
        return 2 * int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return 4 + self.values * self.dtype.itemsize

    def pack(self, k: np.ndarray, v: np.ndarray, n: np.ndarray) -> np.ndarray:
        """k, v (R, L, H, keep, D) float32, n (R,) -> (R, nbytes) uint8."""
        payload = np.stack([k, v], axis=1).astype(self.dtype).reshape(len(n), -1).view(np.uint8)
        return self._row(n, payload)

    def unpack(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, payload = self._split(rows)
        kv = payload.view(self.dtype).reshape(len(n), 2, *self.shape).astype(np.float32)
        return kv[:, 0], kv[:, 1], n

    def _row(self, n: np.ndarray, payload: np.ndarray) -> np.ndarray:
        head = np.asarray(n, np.int32).reshape(-1, 1).view(np.uint8)
        row = np.concatenate([head, payload], axis=1)
        pad = -row.shape[1] % 4  # the cache stores float32 words
        return np.pad(row, ((0, 0), (0, pad))) if pad else row

    def _split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)
        return rows[:, :4].copy().view(np.int32).ravel(), rows[:, 4 : self.nbytes].copy()


class Int8Codec(Codec):
    """int8 with one fp16 scale per channel: per (layer, K/V, head, dim), the largest |x| over the memory's
    slots maps to 127, so the round-trip error of an element is at most half its channel's scale."""

    def __init__(self, shape: tuple[int, int, int, int]) -> None:
        super().__init__(shape, np.int8)
        self.spec = "int8"
        L, H, _, D = shape
        self.n_scales = 2 * L * H * D

    @property
    def nbytes(self) -> int:
        return 4 + self.values + 2 * self.n_scales

    def pack(self, k: np.ndarray, v: np.ndarray, n: np.ndarray) -> np.ndarray:
        x = np.stack([k, v], axis=1)  # (R, 2, L, H, keep, D)
        scale = (np.abs(x).max(axis=4, keepdims=True) / 127).astype(np.float16)
        s32 = np.maximum(scale.astype(np.float32), np.finfo(np.float32).tiny)  # an all-zero channel stays 0
        q = np.clip(np.rint(x / s32), -127, 127).astype(np.int8)
        R = len(n)
        return self._row(
            n, np.concatenate([scale.reshape(R, -1).view(np.uint8), q.reshape(R, -1).view(np.uint8)], 1)
        )

    def unpack(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, payload = self._split(rows)
        L, H, keep, D = self.shape
        R = len(n)
        scale = payload[:, : 2 * self.n_scales].copy().view(np.float16).reshape(R, 2, L, H, 1, D)
        q = payload[:, 2 * self.n_scales :].copy().view(np.int8).reshape(R, 2, L, H, keep, D)
        x = q.astype(np.float32) * scale.astype(np.float32)
        return x[:, 0], x[:, 1], n


class PQCodec(Codec):
    """FAISS product quantisation of every head vector: ``m`` sub-quantisers of 256 centroids, one codebook per
    (layer, K/V) shared by the heads. ``centroids``: (L, 2, m, 256, D / m) float32."""

    def __init__(self, shape: tuple[int, int, int, int], centroids: np.ndarray) -> None:
        super().__init__(shape, np.uint8)
        self.centroids = np.ascontiguousarray(centroids, np.float32)
        self.m = self.centroids.shape[2]
        digest = hashlib.sha1(self.centroids.tobytes()).hexdigest()[:12]
        self.spec = f"pq{self.m}:{digest}"
        self._quantizers: dict[tuple[int, int], Any] = {}  # (layer, K/V) -> faiss.ProductQuantizer

    @property
    def nbytes(self) -> int:
        L, H, keep, _ = self.shape
        return 4 + 2 * L * H * keep * self.m

    @staticmethod
    def train(
        shape: tuple[int, int, int, int], k: np.ndarray, v: np.ndarray, n: np.ndarray, m: int
    ) -> PQCodec:
        """Learn the codebooks from memories k, v (R, L, H, keep, D) (their filled slots only)."""
        import faiss

        L, H, keep, D = shape
        if D % m:
            raise MemlmError(f"pq_m={m} must divide the head dim {D}")
        filled = np.arange(keep)[None, :] < n[:, None]  # (R, keep)
        cents = np.zeros((L, 2, m, 256, D // m), np.float32)
        for layer in range(L):
            for j, x in enumerate((k, v)):
                vecs = np.ascontiguousarray(
                    x[:, layer].transpose(0, 2, 1, 3)[filled].reshape(-1, D), np.float32
                )
                if len(vecs) < 256:
                    raise MemlmError(
                        f"pq storage needs >= 256 head vectors to learn its codebooks, got {len(vecs)}"
                    )
                pq = faiss.ProductQuantizer(D, m, 8)
                pq.cp.min_points_per_centroid = 1  # small banks: fewer points per centroid, no warning
                pq.train(vecs)
                cents[layer, j] = faiss.vector_to_array(pq.centroids).reshape(m, 256, D // m)
        return PQCodec(shape, cents)

    def _codes(self, x: np.ndarray, layer: int, j: int) -> np.ndarray:
        """x (N, D) -> (N, m) uint8: the nearest centroid of each sub-vector (FAISS: no (N, m, 256) array)."""
        if (layer, j) not in self._quantizers:
            import faiss

            pq = faiss.ProductQuantizer(self.shape[3], self.m, 8)
            faiss.copy_array_to_vector(self.centroids[layer, j].ravel(), pq.centroids)
            self._quantizers[layer, j] = pq
        return self._quantizers[layer, j].compute_codes(np.ascontiguousarray(x, np.float32))

    def pack(self, k: np.ndarray, v: np.ndarray, n: np.ndarray) -> np.ndarray:
        L, H, keep, D = self.shape
        R = len(n)
        codes = np.zeros((R, L, 2, H, keep, self.m), np.uint8)
        for layer in range(L):
            for j, x in enumerate((k, v)):
                codes[:, layer, j] = self._codes(x[:, layer].reshape(-1, D), layer, j).reshape(
                    R, H, keep, self.m
                )
        return self._row(n, codes.reshape(R, -1))

    def unpack(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, payload = self._split(rows)
        L, H, keep, D = self.shape
        R = len(n)
        codes = payload.reshape(R, L, 2, H, keep, self.m).astype(np.int64)
        out = np.empty((R, L, 2, H, keep, D), np.float32)
        for layer in range(L):
            for j in range(2):
                c = self.centroids[layer, j]  # (m, 256, D/m)
                parts = c[np.arange(self.m), codes[:, layer, j]]  # (R, H, keep, m, D/m)
                out[:, layer, j] = parts.reshape(R, H, keep, D)
        return out[:, :, 0], out[:, :, 1], n


def full_kv_bytes(n_layer: int, n_kv_head: int, head_dim: int, tokens: int) -> int:
    """What a plain fp16 KV cache holds for one reference of ``tokens`` tokens: every layer, head and token."""
    return 2 * n_layer * n_kv_head * tokens * head_dim * 2


# ---- the store ---------------------------------------------------------------------------------------


class MemoryStore:
    """Memories of bank entries for one model: persisted in the bank folder, decoded ones kept in an LRU.

    ``encode(texts) -> Encoded`` turns entry texts into memories with the model's current weights (Memory³'s
    writer, :func:`memlm.model.memory.memory3.encode_references` behind it). ``get(entries)`` returns the
    memories of those entries (encoding and storing what is missing or stale; with ``precompute`` the first
    read of a checkpoint encodes every entry of the bank, as the paper writes memories ahead of reading).
    ``refresh()`` follows the bank's edits. A read-only bank is never written: its memories are encoded on
    demand and kept in the LRU.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        bank: MemoryBank,
        *,
        encode: Callable[[Sequence[str]], Encoded],
        settings: str,
        shape: tuple[int, int, int, int],
        storage: str = "fp16",
        pq_m: int = 8,
        pq_train: int = 4096,
        cache_size: int = 4096,
        on_stale: str = "rebuild",
        precompute: bool = True,
        progress: bool = True,
    ) -> None:
        if storage not in FORMATS:
            raise MemlmError(f"unknown Memory³ storage {storage!r} (known: {', '.join(FORMATS)})")
        self.model, self.bank, self.encode = model, bank, encode
        self.settings, self.shape, self.storage = settings, shape, storage
        self.pq_m, self.pq_train, self.cache_size, self.on_stale = pq_m, pq_train, cache_size, on_stale
        self.precompute, self.progress = precompute, progress
        self._lru: OrderedDict[int, tuple[str, np.ndarray, np.ndarray, int]] = OrderedDict()
        self._weights_state: tuple | None = None
        self._weights_fp: str | None = None
        self._cache = None  # VectorCache of the current fingerprint
        self.codec: Codec | None = None
        self._version = bank.version
        self.encoded = 0  # entries encoded by this store (tests, benchmarks)

    # ---- fingerprint ------------------------------------------------------------------------
    def _state(self) -> tuple:
        # In-place updates bump a tensor's version counter; a swapped tensor has a new data pointer.
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def _check_weights(self) -> None:
        """Re-fingerprint when the weights changed since the last read (cheap: version counters)."""
        state = self._state()
        if state == self._weights_state:
            return
        from memlm.model.checkpoint import weights_fingerprint

        fp = weights_fingerprint(self.model)
        self._weights_state = state
        if fp == self._weights_fp:
            return
        previous, self._weights_fp = self._weights_fp, fp
        self._lru.clear()
        self._cache, self.codec = None, None
        if self.on_stale == "error":
            built = previous or self._other_checkpoint()
            if built is not None:
                raise StaleMemoryError(
                    f"{self.bank.path}: the Memory³ memories were built by weights {built[:16]}, but the model's "
                    f"weights are now {fp[:16]}: they are stale (Memory³, Remark 9). Rebuild them "
                    "(model.memory_options.on_stale: rebuild) or use the checkpoint that built them"
                )

    def _other_checkpoint(self) -> str | None:
        """When the bank holds memories made with these settings by other weights and none by these: the
        other weights' hash; else None."""
        rows = self.bank.connection.execute(
            "SELECT DISTINCT fingerprint FROM vectors WHERE fingerprint LIKE ?",
            (f"{PREFIX}{self.settings}|%",),
        ).fetchall()
        built = {fp.split("|weights=")[1].split("|")[0] for (fp,) in rows if "|weights=" in fp}
        return None if self._weights_fp in built or not built else sorted(built)[0]

    @property
    def fingerprint(self) -> str:
        self._check_weights()
        return f"{PREFIX}{self.settings}|weights={self._weights_fp}|{self._codec().spec}"

    # ---- formats ----------------------------------------------------------------------------
    def _codec(self) -> Codec:
        if self.codec is None:
            if self.storage == "pq":
                self.codec = self._pq_codec()
            elif self.storage == "int8":
                self.codec = Int8Codec(self.shape)
            else:
                self.codec = Codec(self.shape, np.float32 if self.storage == "fp32" else np.float16)
        return self.codec

    def _pq_codec(self) -> PQCodec:
        """Codebooks of these weights: loaded from the bank folder, or trained on a sample of entries."""
        from safetensors.numpy import load_file, save_file

        path = (
            self.bank.path
            / "vectors"
            / f"memory3-pq{self.pq_m}-{self._weights_fp[:16]}-{_sha(self.settings)}.safetensors"
        )
        if path.is_file():
            return PQCodec(self.shape, load_file(str(path))["centroids"])
        texts = [
            t
            for (t,) in self.bank.connection.execute(
                "SELECT text FROM entries ORDER BY id LIMIT ?", (self.pq_train,)
            )
        ]
        enc = self.encode(texts)
        codec = PQCodec.train(
            self.shape,
            enc.k.float().cpu().numpy(),
            enc.v.float().cpu().numpy(),
            enc.n.cpu().numpy(),
            self.pq_m,
        )
        if not self.bank.readonly:
            path.parent.mkdir(exist_ok=True)
            save_file({"centroids": codec.centroids}, str(path))
        return codec

    def _vector_cache(self):
        if self._cache is None and not self.bank.readonly:
            from memlm.bank.vectors import VectorCache
            from memlm.encode.base import CallableEncoder

            codec = self._codec()
            encoder = CallableEncoder(
                self._encode_rows, dim=codec.nbytes // 4, fingerprint=self.fingerprint, normalise=False
            )
            self._cache = VectorCache(self.bank, encoder, key="text")
            if (
                self.precompute
            ):  # written once, ahead of reading (paper); later edits re-encode one entry each
                self._cache.sync(progress=self.progress)
        return self._cache

    def _encode_rows(self, texts: list[str]) -> np.ndarray:
        """Entry texts -> packed rows viewed as float32 words (what the VectorCache stores)."""
        enc = self.encode(texts)
        self.encoded += len(texts)
        rows = self._codec().pack(
            enc.k.float().cpu().numpy(), enc.v.float().cpu().numpy(), enc.n.cpu().numpy()
        )
        return rows.view(np.float32)

    # ---- reading ----------------------------------------------------------------------------
    def refresh(self, *, reencode: bool = False) -> int:
        """Evict what the bank changed or deleted since the last read (``reencode``: and encode the changed
        entries that still exist now, not at their next read); returns how many entries changed."""
        version = self.bank.version
        if version == self._version:
            return 0
        changed = self.bank.changed_since(self._version)
        for i in changed:
            self._lru.pop(i, None)
        self._version = version
        if reencode and changed:
            self._check_weights()
            for s in range(0, len(changed), 4096):
                alive = [
                    e for e in self.bank.get_many(changed[s : s + 4096], missing_ok=True) if e is not None
                ]
                if alive:
                    self._load(alive)
        return len(changed)

    def get(self, entries: Sequence[Entry]) -> Encoded:
        """Memories of ``entries`` (as read from the bank now), in order: (R, L, H, keep, D) float32 on CPU."""
        self.refresh()
        self._check_weights()
        missing = [e for e in entries if self._lru.get(e.id, ("",))[0] != e.content_hash]
        if missing:
            self._load(list({e.id: e for e in missing}.values()))
        k, v, n = [], [], []
        for e in entries:
            _, ek, ev, en = self._lru[e.id]
            self._lru.move_to_end(e.id)
            k.append(ek)
            v.append(ev)
            n.append(en)
        out = Encoded(torch.from_numpy(np.stack(k)), torch.from_numpy(np.stack(v)), torch.tensor(n))
        while len(self._lru) > max(self.cache_size, len(entries)):
            self._lru.popitem(last=False)
        return out

    def _load(self, entries: list[Entry]) -> None:
        cache = self._vector_cache()
        codec = self._codec()
        if cache is not None:
            ids = [e.id for e in entries]
            cache.sync(ids)
            rows = cache.get(ids)
        else:  # read-only bank: encode, never store
            rows = self._encode_rows([e.text for e in entries])
        k, v, n = codec.unpack(rows)
        for e, ek, ev, en in zip(entries, k, v, n):
            self._lru[e.id] = (e.content_hash, ek, ev, int(en))


def _sha(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()[:12]
