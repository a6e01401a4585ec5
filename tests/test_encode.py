"""Encoders: hashing (deterministic, unit, lexical similarity), the callable adapter, and offline MiniLM."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from memlm.encode import CallableEncoder, Encoder, HashingEncoder, load_encoder
from memlm.errors import ConfigError, InputError


def test_hashing_is_deterministic_unit_and_lexical():
    enc = HashingEncoder(dim=128)
    texts = ["Paris is the capital of France.", "paris is the capital of france", "Bananas are yellow."]
    v = enc.encode(texts)
    assert v.shape == (3, 128) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.99 and v[0] @ v[2] < 0.5
    assert isinstance(enc, Encoder) and enc.fingerprint != HashingEncoder(dim=64).fingerprint
    # the same vectors in a fresh interpreter (crc32, not Python's salted hash)
    code = "from memlm.encode import HashingEncoder; print(HashingEncoder(dim=128).encode(['Paris is the capital of France.']).tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    np.testing.assert_allclose(np.array(eval(out))[0], v[0], atol=1e-6)


def test_callable_adapter_for_model_layers():
    emb = torch.nn.EmbeddingBag(1000, 16)  # stands in for "the LM's own layers"

    def fn(texts):
        tok = [torch.tensor([hash(w) % 1000 for w in t.split()]) for t in texts]
        return emb(torch.cat(tok), torch.tensor([0, *np.cumsum([len(t) for t in tok])[:-1]]))

    enc = CallableEncoder(fn, dim=16, fingerprint="toy-lm:step0", batch_size=2)
    v = enc.encode(["a b", "c d e", "f"])
    assert v.shape == (3, 16) and isinstance(v, np.ndarray)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    with pytest.raises(InputError, match=r"returned shape \(1, 16\), expected \(N, 8\)"):
        CallableEncoder(fn, dim=8, fingerprint="wrong").encode(["a"])
    with pytest.raises(InputError, match="fingerprint"):
        CallableEncoder(fn, dim=16, fingerprint="")


def test_load_encoder_specs():
    assert load_encoder("hashing:48").dim == 48
    with pytest.raises(ConfigError, match="unknown encoder"):
        load_encoder("bert")
    with pytest.raises(ConfigError, match="integer DIM"):
        load_encoder("hashing:big")


@pytest.mark.slow
def test_minilm_offline_semantic():
    enc = load_encoder("minilm")
    v = enc.encode(
        ["The capital of France is Paris.", "Paris is France's capital city.", "I like green bananas."]
    )
    assert v.shape == (3, 384) and enc.dim == 384 and enc.fingerprint.startswith("minilm-l6-v2:")
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3  # semantic, not lexical, similarity


@pytest.mark.slow
def test_minilm_onnx_runtime_equals_sentence_transformers():
    """The ONNX path (exported graph, equal-length batches) computes sentence-transformers' vectors, in order."""
    from memlm.encode.minilm import MiniLMEncoder, onnx_available

    if not onnx_available():
        pytest.skip("onnxruntime/onnx not installed")
    texts = ["Paris is the capital of France.", "", "a b", "word " * 260, "Ada was born in 1815.", "a b c",
             "Ünïcödé text, with punctuation!"]  # fmt: skip
    fast, ref = MiniLMEncoder(runtime="onnx", batch_size=2), MiniLMEncoder(runtime="torch")
    a, b = fast.encode(texts), ref.encode(texts)
    assert fast.fingerprint == ref.fingerprint and a.shape == b.shape == (len(texts), 384)
    assert (a * b).sum(1).min() > 0.9999
    assert fast.encode([]).shape == (0, 384)
