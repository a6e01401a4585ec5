"""Trained checkpoints answering the same questions, side by side: what a user of each design waits for.

``memory_designs.py`` times untrained weights, with LMLM's calls written by a script. Here every model is a
trained checkpoint that reads its own bank (RAG retrieves, LMLM writes its calls and the bank answers them)
and answers held-out questions greedily until it stops (EOS or a line end), through :class:`Generator`, as
``memlm eval qa`` does. Reported per model and batch size: answers/s, decoded tokens/s (every generated or
forced token, lookups included) and tokens per answer, in wall and process-CPU time, each also as a ratio to
the first model. Rounds alternate the models; each keeps its best round (least disturbed on a shared machine).

    .venv/bin/python benchmarks/decode_trained.py --data /work/exp/bios2k \\
        --model dense=/work/exp/runs/dense2k/final --model rag=/work/exp/runs/rag_qn6/final \\
        --model lmlm=/work/exp/runs/lmlm_2k/final --json benchmarks/results/lmlm/decode_trained_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def measure(gen, prompts: list[str], batch: int, max_new_tokens: int) -> dict:
    start, cpu0 = time.perf_counter(), time.process_time()
    outs = gen.generate(prompts, max_new_tokens=max_new_tokens, stop=["\n"], batch_size=batch)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    tokens = sum(len(o.token_ids) for o in outs)
    return {
        "answers_per_s": len(outs) / wall,
        "tokens_per_s": tokens / wall,
        "cpu_answers_per_s": len(outs) / cpu,
        "cpu_tokens_per_s": tokens / cpu,
        "tokens_per_answer": tokens / len(outs),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a `memlm data bios` folder (its qa/<split>.jsonl is asked)")
    p.add_argument("--split", default="unseen")
    p.add_argument("--model", action="append", required=True, help="NAME=FOLDER; the first is the 1.00x")
    p.add_argument("--questions", type=int, default=64, help="per batch size (the first ones of the split)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer text, as in `memlm eval qa`")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()

    import torch

    from memlm.generate import Generator

    torch.set_num_threads(args.threads)
    qa = [json.loads(x) for x in (Path(args.data) / "qa" / f"{args.split}.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in qa[: args.questions]]
    batches = [int(b) for b in args.batches.split(",")]
    models = dict(m.split("=", 1) for m in args.model)
    gens = {name: Generator.from_pretrained(folder) for name, folder in models.items()}
    for gen in gens.values():  # load encoders, indexes and caches outside the timings
        gen.generate(prompts[:2], max_new_tokens=args.max_new_tokens, stop=["\n"])
    best: dict[str, dict[str, dict]] = {name: {} for name in gens}
    for _ in range(args.rounds):
        for name, gen in gens.items():
            for b in batches:
                r = measure(gen, prompts, b, args.max_new_tokens)
                old = best[name].get(str(b))
                if old is None or r["cpu_tokens_per_s"] > old["cpu_tokens_per_s"]:
                    best[name][str(b)] = r
    first = next(iter(best))
    keys = ("answers_per_s", "tokens_per_s", "cpu_answers_per_s", "cpu_tokens_per_s")
    for name in best:
        for b, r in best[name].items():
            r["vs_" + first] = {k: r[k] / best[first][b][k] for k in keys}
    print("| model | batch | answers/s CPU (x) | tokens/s CPU (x) | tokens per answer |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in best:
        for b, r in best[name].items():
            v = r["vs_" + first]
            print(f"| {name} | {b} | {r['cpu_answers_per_s']:.1f} ({v['cpu_answers_per_s']:.2f}x) "
                  f"| {r['cpu_tokens_per_s']:.0f} ({v['cpu_tokens_per_s']:.2f}x) | {r['tokens_per_answer']:.1f} |")  # fmt: skip
    if args.json:
        out = {"config": vars(args), "models": models, "results": best,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                           "torch": torch.__version__}}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    for gen in gens.values():
        gen.close()


if __name__ == "__main__":
    main()
