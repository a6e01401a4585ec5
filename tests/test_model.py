"""Backbone: shapes, backward, causality, cached decoding, and the memory extension points."""

import pytest
import torch
from torch import nn

from memlm.model import GPT, ModelConfig
from memlm.model.memory import LayerHooks, MemoryContext, MemoryDesign, register_memory_design

TINY = dict(vocab_size=97, n_layer=2, n_head=4, n_embd=32, block_size=64)


def tiny(**kw) -> GPT:
    return GPT(ModelConfig(**{**TINY, **kw})).eval()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_shapes_and_backward(n_kv_head):
    model = tiny(n_kv_head=n_kv_head).train()
    x = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    targets[:, :5] = -100
    out = model(x, targets)
    assert out.logits.shape == (3, 16, 97)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.wte.weight.grad.abs().sum() > 0


def test_loss_ignores_masked_targets():
    model = tiny()
    x = torch.randint(0, 97, (2, 8))
    t = torch.randint(0, 97, (2, 8))
    masked = t.clone()
    masked[:, 4:] = -100
    logits = model(x).logits
    expected = nn.functional.cross_entropy(logits[:, :4].reshape(-1, 97), t[:, :4].reshape(-1))
    assert torch.allclose(model(x, masked).loss, expected, atol=1e-6)
    assert model(x, torch.full_like(t, -100)).loss.item() == 0.0  # no NaN when nothing counts


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_later_tokens_never_change_earlier_logits(n_kv_head):
    model = tiny(n_kv_head=n_kv_head)
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = model(x).logits, model(y).logits
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_cached_and_uncached_decoding_agree():
    model = tiny(n_kv_head=2, init_std=0.2)
    x = torch.randint(0, 97, (2, 24))
    full = model(x).logits
    cache = model.new_cache(2)
    steps = [model(x[:, :10], cache=cache).logits]
    steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(10, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


def test_left_padding_matches_unpadded_rows():
    model = tiny(init_std=0.2)
    short, long = torch.randint(3, 97, (5,)), torch.randint(3, 97, (9,))
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0, 4:], ids[1] = short, long
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(out[0, 4:], model(short[None]).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], model(long[None]).logits[0], atol=1e-5, rtol=0)


def test_block_size_is_enforced():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 65, dtype=torch.long))


# ---- extension points: a test design exercising every hook --------------------------------------


class PrefixKV(nn.Module):
    """Gives each layer the key/values found in ``memory.inputs`` (or nothing)."""

    def forward(self, memory: MemoryContext):
        return memory.inputs


class ZeroGated(nn.Module):
    """Reads a vector from memory through a zero-initialised gate: a no-op until trained."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, h, memory):
        return self.gate * self.proj(h)


@register_memory_design("_test_hooks")
class HookDesign(MemoryDesign):
    def layer_hooks(self, config, layer_idx):
        return LayerHooks(kv=PrefixKV(), ffn_branch=ZeroGated(config.n_embd), cross=ZeroGated(config.n_embd))


def test_hooks_with_empty_memory_equal_the_base_model():
    base = tiny(init_std=0.2)
    hooked = tiny(init_std=0.2, memory="_test_hooks")
    missing, unexpected = hooked.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".memory." in k or ".cross" in k for k in missing)
    x = torch.randint(0, 97, (2, 12))
    empty = torch.zeros(2, 4, 0, 8)  # (B, n_kv_head, M=0, hd)
    out = hooked(x, memory=MemoryContext(inputs=(empty, empty, None))).logits
    torch.testing.assert_close(out, base(x).logits, atol=1e-5, rtol=0)


def test_prefix_kv_is_read_and_can_be_masked_causally():
    model = tiny(init_std=0.2, memory="_test_hooks")
    x = torch.randint(0, 97, (1, 10))
    k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)
    plain = model(x).logits
    with_mem = model(x, memory=MemoryContext(inputs=(k, v, None))).logits
    assert not torch.allclose(plain, with_mem, atol=1e-3)
    # A mask that opens the memory only from position 5 on leaves positions < 5 as without memory.
    mask = torch.zeros(1, 10, 3, dtype=torch.bool)
    mask[:, 5:] = True
    masked = model(x, memory=MemoryContext(inputs=(k, v, mask))).logits
    torch.testing.assert_close(masked[:, :5], plain[:, :5], atol=1e-5, rtol=0)
    assert not torch.allclose(masked[:, 5:], plain[:, 5:], atol=1e-3)


def test_prefix_kv_with_cache_matches_full_forward():
    model = tiny(init_std=0.2, memory="_test_hooks", n_kv_head=2)
    x = torch.randint(0, 97, (2, 12))
    mem = MemoryContext(inputs=(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8), None))
    full = model(x, memory=mem).logits
    cache = model.new_cache(2)
    parts = [model(x[:, :7], cache=cache, memory=mem).logits]
    parts += [model(x[:, t : t + 1], cache=cache, memory=mem).logits for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=0)


def test_replace_ffn_hook_removes_the_ffn():
    @register_memory_design("_test_replace")
    class Replace(MemoryDesign):
        def layer_hooks(self, config, layer_idx):
            return LayerHooks(ffn_branch=ZeroGated(config.n_embd), replace_ffn=layer_idx == 1)

    model = tiny(memory="_test_replace")
    assert model.blocks[0].ffn is not None and model.blocks[1].ffn is None
    assert model(torch.randint(0, 97, (1, 5))).logits.shape == (1, 5, 97)
