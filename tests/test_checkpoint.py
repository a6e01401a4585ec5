"""save_pretrained / from_pretrained: identical logits, and clear errors on bad folders."""

import json

import pytest
import torch

from memlm.errors import CheckpointError
from memlm.model import GPT, ModelConfig
from memlm.model.checkpoint import load_pretrained
from memlm.tokenizer import Tokenizer


@pytest.fixture
def saved(tmp_path):
    model = GPT(ModelConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=32, block_size=32))
    tok = Tokenizer.train(["hello memory bank"] * 10, vocab_size=300)
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    return model, tmp_path / "m"


def test_save_load_gives_identical_logits(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "fingerprint.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    loaded, tok = load_pretrained(path)
    x = torch.randint(0, 300, (2, 9))
    assert torch.equal(loaded(x).logits, model.eval()(x).logits)
    assert loaded.fingerprint() == model.fingerprint()
    assert loaded.lm_head.weight is loaded.wte.weight  # tying survives the round trip
    assert tok.encode("hello") == Tokenizer.load(path).encode("hello")


def test_fingerprint_changes_with_weights(saved):
    model, _ = saved
    before = model.fingerprint()
    with torch.no_grad():
        model.blocks[0].attn.wqkv.weight[0, 0] += 1e-3
    assert model.fingerprint() != before


def test_corrupt_weights_are_rejected(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        GPT.from_pretrained(path)


def test_flipped_weight_bytes_fail_the_fingerprint(saved):
    _, path = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data, the header stays valid
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fingerprint"):
        GPT.from_pretrained(path)


def test_another_architecture_is_rejected(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "arch": "llama"}))
    with pytest.raises(CheckpointError, match="architecture"):
        GPT.from_pretrained(path)


def test_weights_of_another_size_are_rejected(saved, tmp_path):
    _, path = saved
    other = GPT(ModelConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=64, block_size=32))
    other.save_pretrained(tmp_path / "other")
    (path / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="another model"):
        GPT.from_pretrained(path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        GPT.from_pretrained(tmp_path)
