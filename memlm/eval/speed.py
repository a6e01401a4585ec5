"""Decoding speed of a model through its reader: tokens/s with the design's retrieval included.

Used by ``memlm experiment`` and ``benchmarks/memory_designs.py``: each batch of prompts goes through
``reader.prompts`` (retrieval, layout) and is decoded greedily for exactly ``new_tokens`` tokens (EOS never stops
a row, so every design decodes the same number of tokens), with the reader's step hook installed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from memlm.generate import GenerationConfig, decode


def decode_tokens_per_s(
    model, reader, prompts: Sequence[str], *, batch_size: int, new_tokens: int = 32, warmup: bool = True
) -> float:
    """Generated tokens per second over ``prompts`` in batches of ``batch_size``."""
    cfg = GenerationConfig(max_new_tokens=new_tokens)
    pad = reader.tokenizer.pad_id

    def run(texts: Sequence[str]) -> None:
        for i in range(0, len(texts), batch_size):
            b = reader.prompts(list(texts[i : i + batch_size]))
            decode(model, b.token_ids, cfg, pad_id=pad, eos_id=-1, hook=reader.step_hook(b), memory=b.memory)

    if warmup:
        run(prompts[:batch_size])
    cold(reader)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(prompts)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return len(prompts) * new_tokens / (time.perf_counter() - t0)


def cold(reader) -> None:
    """Forget the reader's encodings of queries (the question reader's embeddings, LMLM's sentence vectors):
    every timed decode encodes its prompts, as RAG's and Memory³'s do, whatever an earlier pass asked."""
    for cache in (getattr(reader, "question", None), getattr(reader, "_relations", None)):
        if cache is not None:
            cache.clear_cache()
