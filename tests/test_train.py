"""Trainer: exact resume, refusal of foreign checkpoints, masked labels, parameter groups, schedule, run dir."""

import json

import pytest
import torch
from torch import nn

from memlm.config import load_config
from memlm.errors import CheckpointError, ConfigError
from memlm.model.gpt import GPT
from memlm.tokenizer import Tokenizer
from memlm.train import Trainer
from memlm.train.checkpoint import STATE_FILE, list_checkpoints
from memlm.train.optim import build_optimizer, param_groups
from memlm.train.sampler import StepBatchSampler
from memlm.train.schedule import lr_factor

CITIES = ["Paris", "Lima", "Oslo", "Kyoto", "Cairo", "Quito", "Perth"]
DOCS = [f"Person {i} was born in {CITIES[i % 7]} and works at company {i % 5}." for i in range(120)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    Tokenizer.train(DOCS, vocab_size=300).save(root / "tok")
    return root


def tiny_config(corpus, out_dir, *extra):
    return load_config(
        None,
        [
            "--model.vocab_size", "300", "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32",
            "--model.block_size", "32", "--model.dropout", "0.1",
            "--data.train", str(corpus / "train.jsonl"), "--data.val_fraction", "0.2",
            "--data.tokenizer", str(corpus / "tok"), "--data.seq_len", "16",
            "--train.batch_size", "4", "--train.grad_accum", "2", "--train.max_steps", "8",
            "--train.warmup_steps", "2", "--train.lr", "3e-3", "--train.save_every", "3",
            "--train.eval_every", "4", "--train.eval_batches", "2", "--train.log_every", "1",
            "--train.progress", "false", "--train.keep_last", "2",
            "--out_dir", str(out_dir),
            *extra,
        ],
    )  # fmt: skip


def train_losses(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]


def test_resume_retraces_uninterrupted_run(corpus, tmp_path):
    Trainer(tiny_config(corpus, tmp_path / "a")).fit()
    Trainer(tiny_config(corpus, tmp_path / "b")).fit(stop_at=5)  # "killed" after step 5; last checkpoint: 3
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_0000003"]
    assert not (tmp_path / "b" / "final").exists()
    Trainer(tiny_config(corpus, tmp_path / "b")).fit(resume=True)

    full, resumed = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [s for s, _ in full] == list(range(1, 9)) == [s for s, _ in resumed]  # steps 4-5 not repeated
    assert [v for _, v in resumed] == pytest.approx([v for _, v in full], abs=1e-6)
    assert full[-1][1] < full[0][1]  # it learns
    a, b = GPT.from_pretrained(tmp_path / "a" / "final"), GPT.from_pretrained(tmp_path / "b" / "final")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)

    # Run dir: resolved config, provenance, metrics with evals, the last 2 checkpoints, a final model.
    run = tmp_path / "a"
    assert load_config(run / "config.yaml") == tiny_config(corpus, run)
    info = json.loads((run / "run.json").read_text())
    assert {"git_commit", "torch_version", "world_size"} <= info.keys()
    evals = [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"
    ]
    assert [r["step"] for r in evals] == [4, 8]
    assert [p.name for p in list_checkpoints(run)] == ["step_0000006", "step_0000008"]
    state = torch.load(run / "checkpoints" / "step_0000008" / STATE_FILE, weights_only=True)
    assert state["step"] == 8 and "optimizer" in state and "rng" in state
    assert (run / "final" / "tokenizer.json").is_file()


def test_resume_refuses_other_config(corpus, tmp_path):
    Trainer(tiny_config(corpus, tmp_path, "--train.max_steps", "3", "--train.save_every", "3")).fit()
    with pytest.raises(CheckpointError, match=r"train.lr: 0.003 -> 0.001"):
        Trainer(tiny_config(corpus, tmp_path, "--train.max_steps", "3", "--train.lr", "1e-3")).fit(
            resume=True
        )
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(tiny_config(corpus, tmp_path, "--train.max_steps", "3")).fit()
    # Values that do not change the trajectory may differ.
    Trainer(tiny_config(corpus, tmp_path, "--train.max_steps", "3", "--train.log_every", "2")).fit(
        resume=True
    )


def test_resume_refuses_a_checkpoint_whose_weights_changed_on_disk(corpus, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny_config(corpus, tmp_path, "--train.max_steps", "6", "--train.save_every", "3")
    Trainer(cfg).fit(stop_at=3)  # "killed" after the checkpoint at step 3
    ckpt = list_checkpoints(tmp_path)[-1]
    state = load_file(str(ckpt / "model.safetensors"))
    state["norm.weight"] = state["norm.weight"] + 1e-3  # a valid file, other weights: not what was saved
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="do not match fingerprint.json"):
        Trainer(cfg).fit(resume=True)


def test_logged_loss_is_the_mean_since_the_last_line(corpus, tmp_path):
    Trainer(tiny_config(corpus, tmp_path / "every")).fit()
    Trainer(tiny_config(corpus, tmp_path / "fourth", "--train.log_every", "4")).fit()
    every = dict(train_losses(tmp_path / "every"))
    fourth = dict(train_losses(tmp_path / "fourth"))
    assert sorted(fourth) == [4, 8]
    for step in (4, 8):
        assert fourth[step] == pytest.approx(sum(every[s] for s in range(step - 3, step + 1)) / 4, abs=1e-6)


def test_global_batch_is_split_not_changed():
    one = StepBatchSampler(10, seed=1, batch_size=4, end_step=3)
    ranks = [
        list(StepBatchSampler(10, seed=1, batch_size=2, rank=r, world_size=2, end_step=3)) for r in range(2)
    ]
    accum = list(StepBatchSampler(10, seed=1, batch_size=2, grad_accum=2, end_step=3))
    for step, batch in enumerate(one):
        assert ranks[0][step] + ranks[1][step] == batch
        assert accum[2 * step] + accum[2 * step + 1] == batch
    resumed = list(StepBatchSampler(10, seed=1, batch_size=4, start_step=1, end_step=3))
    assert resumed == list(one)[1:]
    # Every epoch visits every sequence once.
    stream = [i for b in StepBatchSampler(10, seed=1, batch_size=5, end_step=4) for i in b]
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10)) and stream[:10] != stream[10:]


def test_ignored_labels_do_not_count():
    model = GPT(
        load_config(None, ["--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2"]).model
    )
    x = torch.randint(0, 100, (2, 8))
    y = torch.randint(0, 100, (2, 8))
    masked = y.clone()
    masked[:, :3] = -100
    out = model(x, targets=masked)
    expected = nn.functional.cross_entropy(out.logits[:, 3:].flatten(0, 1), y[:, 3:].flatten())
    torch.testing.assert_close(out.loss, expected)
    other = masked.clone()
    other[0, 0] = -100
    other[:, :3] = -100
    assert torch.equal(model(x, targets=other).loss, out.loss)


class WithMemory(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)
        self.memory = nn.Linear(4, 4)  # "memory." prefix
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].memory = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))  # ".memory." inside

    def memory_parameter_names(self) -> set[str]:  # what GPT reports for its design's modules
        return {n for n, _ in self.named_parameters() if "memory" in n}


def test_param_groups():
    model = WithMemory()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, memory_lr=1e-2, weight_decay=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}

    def members(group):
        return sorted(names[id(p)] for p in groups[group]["params"])

    assert members("backbone_decay") == ["embed.weight", "proj.weight"]
    assert members("backbone_no_decay") == ["norm.bias", "norm.weight", "proj.bias"]
    assert members("memory_decay") == ["blocks.0.memory.0.weight", "memory.weight"]
    assert members("memory_no_decay") == [
        "blocks.0.memory.0.bias", "blocks.0.memory.1.bias", "blocks.0.memory.1.weight", "memory.bias",
    ]  # fmt: skip
    assert {n: (g["lr"], g["weight_decay"]) for n, g in groups.items()} == {
        "backbone_decay": (1e-3, 0.1),
        "backbone_no_decay": (1e-3, 0.0),
        "memory_decay": (1e-2, 0.1),
        "memory_no_decay": (1e-2, 0.0),
    }
    cfg = load_config(None, ["--train.lr", "2e-3"]).train
    opt = build_optimizer(model, cfg)
    assert [g["lr"] for g in opt.param_groups] == [2e-3] * 4  # memory_lr None: same as lr
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_schedule_values():
    f = lambda s: lr_factor(s, warmup_steps=10, max_steps=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
