"""Backbone speed, measured side by side in one run.

1. Training tokens/s of memlm's GPT against a GPT of the same size built from ``nn.TransformerEncoderLayer``
   (pre-norm, GELU MLP, learned positions, tied embeddings, causal mask): ratio ours / reference.
2. Decoding tokens/s with and without the KV cache at batch 1 and 16 (greedy, same prompts).
3. Against the model a user would otherwise pick: Hugging Face ``transformers``' ``LlamaForCausalLM`` of the
   same shape (RoPE, RMSNorm, SwiGLU of the same width, tied embeddings, SDPA attention): training tokens/s and
   greedy decoding tokens/s with its own KV cache (``generate``), ratio memlm / Llama (target >= 1.0x).
   Skipped when ``transformers`` is not installed.

    .venv/bin/python benchmarks/backbone.py                       # CPU, fp32, sized for 2 cores
    .venv/bin/python benchmarks/backbone.py --device cuda --dtype bf16 --n-layer 12 --n-embd 768 --batch 32
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext

import torch
from torch import nn

from memlm.generate import GenerationConfig, decode
from memlm.model import GPT, ModelConfig


class ReferenceGPT(nn.Module):
    """A GPT from stock PyTorch layers: what a user would write without memlm."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        layer = nn.TransformerEncoderLayer(
            c.n_embd,
            c.n_head,
            4 * c.n_embd,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, c.n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        h = self.wte(x) + self.wpe(torch.arange(T, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=x.device)
        h = self.blocks(h, mask=mask, is_causal=True)
        logits = self.lm_head(self.norm(h))
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_tokens_per_s(model, loss_fn, args, autocast) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.startswith("cuda"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen).to(args.device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def step():
        with autocast:
            loss = loss_fn(model, inp, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    return args.steps * args.batch * args.seq_len / (time.perf_counter() - t0)


def decode_tokens_per_s(model: GPT, batch: int, args, *, cached: bool, autocast) -> float:
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, args.vocab, (batch, args.prompt_len), generator=gen).tolist()
    n = args.new_tokens
    with torch.inference_mode(), autocast:
        if cached:
            cfg = GenerationConfig(max_new_tokens=n)
            run = lambda: decode(model, prompts, cfg, pad_id=0, eos_id=-1)  # noqa: E731 - eos -1: never stop early
        else:

            def run():
                x = torch.tensor(prompts, device=args.device)
                for _ in range(n):  # the whole sequence through the model every step
                    nxt = model(x).logits[:, -1].argmax(-1, keepdim=True)
                    x = torch.cat([x, nxt], dim=1)

        run()  # warm-up
        sync(args.device)
        t0 = time.perf_counter()
        run()
        sync(args.device)
    return batch * n / (time.perf_counter() - t0)


def llama_like(cfg: ModelConfig):
    """transformers' Llama with memlm's shape, or None without transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hf = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(hf)


def llama_loss(m, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = m(input_ids=x, use_cache=False).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def llama_decode_tokens_per_s(model, batch: int, args, *, autocast) -> float:
    gen = torch.Generator().manual_seed(1)  # the same prompts as decode_tokens_per_s
    prompts = torch.randint(3, args.vocab, (batch, args.prompt_len), generator=gen).to(args.device)
    n = args.new_tokens
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.inference_mode(), autocast:
        model.generate(prompts, **kw)  # warm-up
        sync(args.device)
        t0 = time.perf_counter()
        model.generate(prompts, **kw)
        sync(args.device)
    return batch * n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast (CUDA)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: PyTorch's default)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    autocast = (
        torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)
        if args.dtype == "bf16"
        else nullcontext()
    )
    cfg = ModelConfig(
        vocab_size=args.vocab,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        block_size=max(args.seq_len, args.prompt_len + args.new_tokens),
    )
    ours, ref = GPT(cfg).to(args.device), ReferenceGPT(cfg).to(args.device)
    n_ours, n_ref = ours.num_parameters(), sum(p.numel() for p in ref.parameters())
    print(
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(f"params: memlm GPT {n_ours / 1e6:.2f}M, TransformerEncoderLayer GPT {n_ref / 1e6:.2f}M")

    results: dict = {"config": vars(args), "params": {"memlm": n_ours, "reference": n_ref}}
    # Interleave the two models twice and keep each one's best, so a background spike hurts neither alone.
    ours_tps, ref_tps = [], []
    for _ in range(2):
        ours_tps.append(train_tokens_per_s(ours.train(), lambda m, x, y: m(x, y).loss, args, autocast))
        ref_tps.append(train_tokens_per_s(ref.train(), lambda m, x, y: m(x, y), args, autocast))
    t_ours, t_ref = max(ours_tps), max(ref_tps)
    results["train_tokens_per_s"] = {"memlm": t_ours, "reference": t_ref, "ratio": t_ours / t_ref}
    print(f"train tokens/s: memlm {t_ours:,.0f}  reference {t_ref:,.0f}  ratio {t_ours / t_ref:.2f}x")

    ours.eval()
    results["decode_tokens_per_s"] = {}
    for batch in (1, 16):
        cached = decode_tokens_per_s(ours, batch, args, cached=True, autocast=autocast)
        uncached = decode_tokens_per_s(ours, batch, args, cached=False, autocast=autocast)
        results["decode_tokens_per_s"][f"batch{batch}"] = {
            "kv_cache": cached,
            "no_cache": uncached,
            "ratio": cached / uncached,
        }
        print(
            f"decode batch {batch:>2} ({args.prompt_len} prompt + {args.new_tokens} new): "
            f"KV cache {cached:,.0f} tok/s  no cache {uncached:,.0f} tok/s  ratio {cached / uncached:.2f}x"
        )
    llama = llama_like(cfg)
    if llama is not None:
        llama = llama.to(args.device)
        out: dict = {"params": sum(p.numel() for p in llama.parameters())}
        ours_tps, llama_tps = [], []
        for _ in range(2):  # interleaved, best of two each
            ours_tps.append(train_tokens_per_s(ours.train(), lambda m, x, y: m(x, y).loss, args, autocast))
            llama_tps.append(train_tokens_per_s(llama.train(), llama_loss, args, autocast))
        t_ours, t_llama = max(ours_tps), max(llama_tps)
        out["train_tokens_per_s"] = {"memlm": t_ours, "llama": t_llama, "ratio": t_ours / t_llama}
        print(f"vs transformers Llama ({out['params'] / 1e6:.2f}M params), train tokens/s: memlm {t_ours:,.0f}  "
              f"Llama {t_llama:,.0f}  ratio {t_ours / t_llama:.2f}x")  # fmt: skip
        ours.eval(), llama.eval()
        for batch in (1, 16):
            a = decode_tokens_per_s(ours, batch, args, cached=True, autocast=autocast)
            b = llama_decode_tokens_per_s(llama, batch, args, autocast=autocast)
            out[f"decode_batch{batch}"] = {"memlm": a, "llama": b, "ratio": a / b}
            print(f"vs transformers Llama, decode batch {batch:>2}: memlm {a:,.0f} tok/s  Llama {b:,.0f} tok/s  "
                  f"ratio {a / b:.2f}x")  # fmt: skip
        results["vs_transformers_llama"] = out
    results["machine"] = {"platform": platform.platform(), "processor": platform.processor()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
