"""Memory³ decoding speed beside dense and RAG, measured in ONE process, designs interleaved batch by batch.

`memory_designs.py` runs each design in its own process, one after another (so each gets its own peak RSS). On a
shared machine, load that comes and goes between those processes can then decide the ratios. Here the three
models (the same backbone size, untrained) decode the same prompt batch in turn, round after round. Every round
gives a ratio to dense measured seconds apart, and the median over rounds is reported. Retrieval (the reader's
prompts and step hook) is part of each design's time, as in `memory_designs.py`, and the designs use that
file's options (as shipped).

    .venv/bin/python benchmarks/memory3_decode.py --rounds 15 --json benchmarks/results/memory3/decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--designs", default="none,rag,memory3")
    p.add_argument("--people", type=int, default=500)
    p.add_argument("--work", default=".bench_cache")
    p.add_argument("--batches", default="1,16", help="batch sizes")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from memory_designs import DESIGN_OPTIONS, prepare

    from memlm.bank.store import MemoryBank
    from memlm.generate import GenerationConfig, decode
    from memlm.model import GPT, ModelConfig
    from memlm.model.memory import get_memory_design
    from memlm.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    data, bank_dir, tok_dir = prepare(Path(args.work), args.people)
    tok = Tokenizer.load(tok_dir)
    qa = [json.loads(x)["prompt"] for x in (data / "qa/unseen.jsonl").read_text().splitlines()]
    designs = args.designs.split(",")
    runners = {}
    for d in designs:
        torch.manual_seed(0)
        cfg = ModelConfig(
            vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128, memory=d,
            memory_options=DESIGN_OPTIONS.get(d, {}),
        )  # fmt: skip
        model = GPT(cfg).eval()
        design = get_memory_design(d)
        reader = design.reader(model, tok, MemoryBank.open(bank_dir) if design.uses_bank else None)
        reader.prompts(qa[:2])  # retriever built, memories written: outside the timings
        runners[d] = (model, reader)

    gcfg = GenerationConfig(max_new_tokens=args.new_tokens)

    def run(d: str, prompts: list[str]) -> tuple[float, float]:
        """(tokens/s, share of the time spent in reader.prompts: retrieval and layout)"""
        model, reader = runners[d]
        t0 = time.perf_counter()
        with torch.no_grad():
            b = reader.prompts(prompts)
            t1 = time.perf_counter()
            decode(model, b.token_ids, gcfg, pad_id=tok.pad_id, eos_id=-1, hook=reader.step_hook(b),
                   memory=b.memory)  # fmt: skip
        t = time.perf_counter() - t0
        return len(prompts) * args.new_tokens / t, (t1 - t0) / t

    result: dict = {"config": vars(args), "design_options": DESIGN_OPTIONS, "batches": {}}
    for batch in map(int, args.batches.split(",")):
        tok_s: dict[str, list[float]] = {d: [] for d in designs}
        prep: dict[str, list[float]] = {d: [] for d in designs}
        for r in range(args.rounds + 1):
            prompts = qa[r * batch : (r + 1) * batch]  # other prompts every round, the same for every design
            for d in designs:
                speed, share = run(d, prompts)
                if r:  # round 0 warms up
                    tok_s[d].append(speed)
                    prep[d].append(share)
        base = tok_s[designs[0]]
        row = {}
        for d in designs:
            ratios = [a / b for a, b in zip(tok_s[d], base)]
            row[d] = {
                "tok_s_median": statistics.median(tok_s[d]),
                "vs_dense_median": statistics.median(ratios),
                "prompts_share_median": statistics.median(prep[d]),
            }
            if "rag" in tok_s:
                row[d]["vs_rag_median"] = statistics.median([a / b for a, b in zip(tok_s[d], tok_s["rag"])])
        result["batches"][batch] = row
        for d, v in row.items():
            print(f"batch {batch} {d}: " + ", ".join(f"{k} {x:.2f}" for k, x in v.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
