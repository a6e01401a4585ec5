"""2-process DDP on CPU (gloo, launched by torchrun) ends with identical weights on both ranks and matches
one process trained on the same global batch.

Run as a script, this file is the torchrun worker: ``python -m torch.distributed.run --nproc_per_node 2
tests/test_ddp.py CORPUS OUT BATCH_SIZE``; each rank writes its final weights to ``OUT/rank{r}.safetensors``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DOCS = [f"Person {i} was born in city {i % 7} and studied subject {i % 3}." for i in range(80)]
STEPS = 4


def run_worker(corpus: Path, out: Path, batch_size: int) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from memlm.config import load_config
    from memlm.train import Trainer

    torch.set_num_threads(1)
    cfg = load_config(
        None,
        [
            "--model.vocab_size", "300", "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32",
            "--model.block_size", "16",
            "--data.train", str(corpus / "train.jsonl"), "--data.tokenizer", str(corpus / "tok"),
            "--data.seq_len", "16",
            "--train.batch_size", str(batch_size), "--train.max_steps", str(STEPS), "--train.warmup_steps", "1",
            "--train.lr", "3e-3", "--train.log_every", "1", "--train.progress", "false",
            "--out_dir", str(out / "run"),
        ],
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit()
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.contiguous() for k, v in trainer.model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    assert not dist.is_initialized()  # the trainer tears down the group it created


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    from safetensors.torch import load_file

    from memlm.tokenizer import Tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    Tokenizer.train(DOCS, vocab_size=300).save(corpus / "tok")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    ddp, single = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, __file__, str(corpus), str(ddp), "2"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, __file__, str(corpus), str(single), "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0, r1 = load_file(str(ddp / "rank0.safetensors")), load_file(str(ddp / "rank1.safetensors"))
    one = load_file(str(single / "rank0.safetensors"))
    assert r0.keys() == r1.keys() == one.keys()
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name  # DDP keeps the replicas bit-identical
        torch.testing.assert_close(r0[name], one[name], rtol=0, atol=1e-5, msg=name)
    losses = [
        [json.loads(line)["loss"] for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
        for d in (ddp, single)
    ]
    assert len(losses[0]) == STEPS and losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert losses[0][-1] < losses[0][0]  # it trained: the comparison is not between two untouched models
    run = json.loads((ddp / "run" / "run.json").read_text())
    assert run["world_size"] == 2


if __name__ == "__main__":
    run_worker(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
