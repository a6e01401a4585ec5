"""The backbone's memory hooks, tested with memories that really change the output.

Each hook (``kv``, ``ffn_branch`` added or replacing the FFN, ``cross``) must be applied — remove the line in
``Block.forward`` that applies it and these tests fail —, initialise itself (the backbone's init must not
overwrite it), train at ``memory_lr`` whichever hook it is, and report what it read to the generator.
"""

import pytest
import torch
from torch import nn

from memlm.config import load_config
from memlm.generate import Generator
from memlm.model import GPT, ModelConfig
from memlm.model.memory import (
    LayerHooks,
    MemoryContext,
    MemoryDesign,
    MemoryReader,
    PromptBatch,
    register_memory_design,
)
from memlm.tokenizer import DB_ENTITY, DB_RETURN, Tokenizer
from memlm.train.optim import build_optimizer

TINY = dict(vocab_size=300, n_layer=2, n_head=4, n_embd=32, block_size=64)


class AddVector(nn.Module):
    """ffn_branch / cross: adds a learned vector (plus a zero-initialised linear map) when there is memory."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.linspace(-1, 1, n_embd))
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        nn.init.zeros_(self.proj.weight)  # the backbone's init must leave this alone

    def forward(self, h, memory):
        if memory is None:
            return torch.zeros_like(h)
        if memory.inputs == "record":  # an in-model retrieval, as ExplicitLM / PlugLM report it
            memory.retrieved_ids = torch.tensor([7, 9]).expand(h.shape[0], h.shape[1], 2)
        return self.v.expand_as(h) + self.proj(h)


class PrefixKV(nn.Module):
    """kv: two memory slots; ``memory.inputs`` may carry a (B, T, 2) mask saying which positions see them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.randn(1, config.n_kv_head, 2, config.head_dim))
        self.v = nn.Parameter(torch.randn(1, config.n_kv_head, 2, config.head_dim) * 3)

    def forward(self, memory):
        mask = memory.inputs if isinstance(memory.inputs, torch.Tensor) else None
        B = mask.shape[0] if mask is not None else 1
        return self.k.expand(B, -1, -1, -1), self.v.expand(B, -1, -1, -1), mask


def _design(name: str, make):
    @register_memory_design(name)
    class Design(MemoryDesign):
        def layer_hooks(self, config, layer_idx):
            return make(config) if layer_idx == 1 else LayerHooks()

    return name


ADD = _design("test-ffn-add", lambda c: LayerHooks(ffn_branch=AddVector(c.n_embd)))
REPLACE = _design("test-ffn-replace", lambda c: LayerHooks(ffn_branch=AddVector(c.n_embd), replace_ffn=True))
CROSS = _design("test-cross", lambda c: LayerHooks(cross=AddVector(c.n_embd)))
KV = _design("test-kv", lambda c: LayerHooks(kv=PrefixKV(c)))
ALL = _design(
    "test-all",
    lambda c: LayerHooks(kv=PrefixKV(c), ffn_branch=AddVector(c.n_embd), cross=AddVector(c.n_embd)),
)


def model(design: str) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**TINY, memory=design)).eval()


@pytest.mark.parametrize("design", [ADD, REPLACE, CROSS, KV])
def test_each_hook_changes_the_output_only_with_memory(design):
    m = model(design)
    x = torch.randint(3, 300, (1, 12))
    base, read = m(x).logits, m(x, memory=MemoryContext()).logits
    assert not torch.allclose(base, read, atol=1e-3)  # the hook was applied
    assert torch.equal(m(x, memory=None).logits, base)


def test_replacing_branch_is_the_whole_ffn():
    m = model(REPLACE)
    assert m.blocks[1].ffn is None and m.blocks[0].ffn is not None
    x = torch.randint(3, 300, (1, 8))
    # Without memory the branch gives zeros: block 1 is then attention only.
    block = m.blocks[1]
    h = m.wte(x)
    cos, sin = m.rope(torch.arange(8)[None])
    h0 = m.blocks[0](h, cos, sin, None, None, None)
    expected = h0 + block.attn(block.attn_norm(h0), cos, sin, mask=None)
    torch.testing.assert_close(block(h0, cos, sin, None, None, None), expected)


def test_kv_mask_hides_memory_from_positions_it_names():
    m = model(KV)
    x = torch.randint(3, 300, (1, 10))
    mask = torch.ones(1, 10, 2, dtype=torch.bool)
    mask[:, :4] = False  # positions 0-3 may not see the memory slots
    out = m(x, memory=MemoryContext(inputs=mask)).logits
    base = m(x).logits
    torch.testing.assert_close(out[:, :4], base[:, :4], atol=1e-5, rtol=0)
    assert not torch.allclose(out[:, 4:], base[:, 4:], atol=1e-3)


def test_hooks_initialise_themselves_and_train_at_memory_lr():
    m = model(ALL)
    hooks = m.blocks[1]
    assert hooks.memory.proj.weight.abs().sum() == 0 and hooks.cross.proj.weight.abs().sum() == 0
    torch.testing.assert_close(hooks.memory.v.data, torch.linspace(-1, 1, 32))
    names = m.memory_parameter_names()
    expected = {n for n, _ in m.named_parameters() if n.startswith(("blocks.1.memory", "blocks.1.cross"))}
    assert expected <= names and "blocks.1.cross_norm.weight" in names
    assert not any(n.startswith(("blocks.0.", "wte", "norm")) for n in names)
    cfg = load_config(None, ["--train.lr", "1e-3", "--train.memory_lr", "5e-2"]).train
    opt = build_optimizer(m, cfg)
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in m.named_parameters():
        assert by_param[id(p)] == (5e-2 if name in names else 1e-3), name


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["Q: who? A: Ada", "the quick brown fox"] * 20, vocab_size=300)


class ContextReader(MemoryReader):
    """Hands every prompt batch a memory context that makes the hook record a retrieval."""

    def prompts(self, prompts):
        batch = super().prompts(prompts)
        return PromptBatch(batch.token_ids, memory=MemoryContext(inputs="record"), used=batch.used)


def test_retrieval_inside_the_model_reaches_the_generation(tokenizer):
    m = model(ADD)
    gen = Generator(m, tokenizer, reader=ContextReader(m, tokenizer))
    out = gen.generate(["Q: who?"], max_new_tokens=3)[0]
    assert out.retrieved == [7, 9]
    assert [e["entry_ids"] for e in out.trace] == [[7, 9]] * len(out.token_ids)


class KeepSpecial(MemoryReader):
    skip_special_tokens = False


def test_special_tokens_survive_when_the_reader_asks_and_stop_strings_see_them(tokenizer):
    m = model("none")
    call = [tokenizer.token_id(DB_ENTITY), *tokenizer.encode(" Ada"), tokenizer.token_id(DB_RETURN)]

    def force():
        def hook(state):
            if state.step == 0:
                state.force(0, [*call, *tokenizer.encode(" x y z")])

        return hook

    plain = Generator(m, tokenizer, hook_factory=force).generate(["Q:"], max_new_tokens=8)[0]
    assert DB_ENTITY not in plain.text  # the default strips them
    gen = Generator(m, tokenizer, reader=KeepSpecial(m, tokenizer), hook_factory=force)
    out = gen.generate(["Q:"], max_new_tokens=12, stop=[DB_RETURN])[0]
    assert out.text == f"{DB_ENTITY} Ada" and out.finish_reason == "stop"
    assert len(out.token_ids) == len(call)  # stopped right after <|db_return|>
