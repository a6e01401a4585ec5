"""Decoding: cache consistency, batching with left padding, sampling controls, hooks, streaming."""

import pytest
import torch

from memlm.generate import GenerationConfig, Generator, decode
from memlm.model import GPT, ModelConfig
from memlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A large init std makes a random model's greedy output vary from token to token.
    return GPT(
        ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=96, init_std=0.3)
    )


@pytest.fixture(scope="module")
def tokenizer():
    text = ["the quick brown fox jumps over the lazy dog", "Zürich — 東京 — 🚀 launch", "Q: who? A: Ada"] * 20
    return Tokenizer.train(text, vocab_size=300)


def decode_all(model, prompts, cfg, hook=None):
    return decode(model, prompts, cfg, pad_id=0, eos_id=2, hook=hook)


def reference_greedy(model, prompt, n):
    """Greedy decoding without a cache: the whole sequence through the model every step."""
    x, out = torch.tensor([prompt]), []
    for _ in range(n):
        t = int(model(x).logits[0, -1].argmax())
        out.append(t)
        if t == 2:
            break
        x = torch.cat([x, torch.tensor([[t]])], 1)
    return out


def test_batched_cached_greedy_equals_uncached_per_prompt(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43]]
    state = decode_all(model, prompts, GenerationConfig(max_new_tokens=12))
    for p, got in zip(prompts, state.tokens):
        assert got == reference_greedy(model, p, 12)
    assert len(set(map(tuple, state.tokens))) == 3


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    prompts = [[5, 6, 7]]
    greedy = decode_all(model, prompts, GenerationConfig(max_new_tokens=10)).tokens
    topk1 = decode_all(
        model, prompts, GenerationConfig(max_new_tokens=10, temperature=1.0, top_k=1, seed=3)
    ).tokens
    assert topk1 == greedy
    tiny_p = decode_all(
        model, prompts, GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=3)
    )
    assert tiny_p.tokens == greedy
    cfg = GenerationConfig(max_new_tokens=10, temperature=5.0, seed=7)
    a, b = decode_all(model, prompts, cfg).tokens, decode_all(model, prompts, cfg).tokens
    assert a == b and a != greedy


def test_stop_tokens_end_rows_independently(model):
    prompts = [[5, 6, 7], [12, 13]]
    free = decode_all(model, prompts, GenerationConfig(max_new_tokens=10)).tokens
    stop = free[0][3]
    state = decode_all(model, prompts, GenerationConfig(max_new_tokens=10, stop_token_ids=(stop,)))
    assert state.tokens[0] == free[0][: free[0].index(stop) + 1]
    assert state.finished[0]
    if stop not in free[1]:
        assert state.tokens[1] == free[1]


def test_hook_can_force_tokens_and_the_cache_stays_exact(model):
    """The LMLM pattern: pause, inject a looked-up answer, resume with the cache kept."""
    forced = [100, 101, 102]

    def hook(state):
        if state.step == 2:
            state.force(0, forced)
            state.record(0, entry_ids=[42], kind="lookup")

    prompt = [5, 6, 7]
    state = decode_all(model, [prompt], GenerationConfig(max_new_tokens=10), hook=hook)
    toks = state.tokens[0]
    assert toks[2:5] == forced
    assert state.retrieved[0] == [42] and state.trace[0][0]["kind"] == "lookup"
    # Every token after the forced ones is what uncached greedy would pick given the full prefix.
    for t in range(5, len(toks)):
        logits = model(torch.tensor([prompt + toks[:t]])).logits[0, -1]
        assert toks[t] == int(logits.argmax())


@pytest.mark.parametrize("new_tokens", [24, 84])  # 84: no room for every wide step (block 96), some go 1 by 1
def test_rows_forced_at_different_steps_share_the_batch_and_the_cache_stays_exact(model, new_tokens):
    """Forced runs go in one forward with padding for the other rows; every sampled token after them is what
    uncached greedy picks given the row's whole prefix, and a row's forced run costs one forward."""
    plan = {
        0: {2: [100, 101, 102, 103]},
        1: {5: [110, 111]},
        2: {3: [120, 121, 122], 9: [123, 124, 125, 126]},
    }
    prompts = [[5, 6, 7], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [40, 41]]
    calls = []

    def hook(state):
        calls.append(state.step)
        for row, at in plan.items():
            if len(state.tokens[row]) in at and not state.forced[row] and not state.finished[row]:
                state.force(row, at.pop(len(state.tokens[row])))

    state = decode_all(model, prompts, GenerationConfig(max_new_tokens=new_tokens), hook=hook)
    for p, toks in zip(prompts, state.tokens):
        assert len(toks) == new_tokens  # random weights: no EOS within reach (checked by the argmax below)
        for t in range(len(toks)):
            logits = model(torch.tensor([p + toks[:t]])).logits[0, -1]
            if toks[t] < 100:
                assert toks[t] == int(logits.argmax()), t
    assert state.tokens[0][2:6] == [100, 101, 102, 103] and state.tokens[2][9:13] == [123, 124, 125, 126]
    if new_tokens == 24:  # a run of n forced tokens saves a row n - 1 forwards; the batch waits for row 1
        assert len(calls) == 24 - (2 - 1)


def test_hook_can_switch_memory_between_steps(model):
    seen = []

    def hook(state):
        seen.append(state.step)

    decode_all(model, [[5, 6]], GenerationConfig(max_new_tokens=4), hook=hook)
    assert seen == [0, 1, 2, 3]  # before the prompt's forward and between every pair of steps


def test_prompt_too_long_is_a_clear_error(model):
    with pytest.raises(ValueError, match="block_size"):
        decode_all(model, [[5] * 90], GenerationConfig(max_new_tokens=10))


def test_generator_text_api_and_streaming(model, tokenizer):
    gen = Generator(model, tokenizer)
    prompts = ["the quick", "Zürich — 東京", "Q: who? A:"]
    outs = gen.generate(prompts, max_new_tokens=8, batch_size=2)
    assert [o.prompt for o in outs] == prompts
    for o in outs:
        assert o.text == tokenizer.decode(o.token_ids)
        assert o.finish_reason in {"stop", "length"}
    single = gen.generate([prompts[1]], max_new_tokens=8)[0]
    assert single.token_ids == outs[1].token_ids  # batching with left padding changes nothing
    assert "".join(gen.stream(prompts[1], max_new_tokens=8)) == single.text


def test_generator_stop_strings_cut_the_text(model, tokenizer):
    gen = Generator(model, tokenizer)
    free = gen.generate(["the quick"], max_new_tokens=12)[0].text
    if len(free) < 4:
        pytest.skip("random model produced too little text")
    stop = free[2:4]
    out = gen.generate(["the quick"], max_new_tokens=12, stop=[stop])[0]
    assert out.text == free[: free.index(stop)] and out.finish_reason == "stop"
