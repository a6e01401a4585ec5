import random

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so a failure reproduces."""
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


# The memory designs' tests share one tiny bios benchmark, its bank and a tokenizer (per test module: a module
# that needs a private copy, or another tokenizer, defines its own fixture of the same name).
@pytest.fixture(scope="module")
def bios(tmp_path_factory):
    from memlm.data.bios import BiosConfig, generate_bios

    out = tmp_path_factory.mktemp("bios") / "b"
    generate_bios(out, BiosConfig(people=24, seed=0))
    return out


@pytest.fixture(scope="module")
def bank_dir(bios, tmp_path_factory):
    from memlm.bank.store import MemoryBank

    path = tmp_path_factory.mktemp("bank") / "bank"
    with MemoryBank.create(path) as bank:
        bank.import_jsonl(bios / "facts.jsonl")
    return path


@pytest.fixture(scope="module")
def tokenizer(bios):
    import json

    from memlm.tokenizer import Tokenizer

    texts = [json.loads(x)["text"] for x in (bios / "corpus/train.jsonl").read_text().splitlines()]
    texts += [json.loads(x)["text"] for x in (bios / "facts.jsonl").read_text().splitlines()]
    return Tokenizer.train(texts, vocab_size=400)


@pytest.fixture(scope="session")
def memory_train_args():
    """``memlm train`` arguments for a 2-layer, 32-d memory model on a tiny bios corpus (the CLI training tests):
    ``memory_train_args(memory, options_json, train, bank, out, batch_size=..., extra=[...])``."""

    def args(
        memory, options, train, bank, out, *, batch_size=8, max_steps=6, warmup=2, log_every=2, extra=()
    ):
        return [
            "train", "--model.vocab_size", "400", "--model.n_layer", "2", "--model.n_head", "2",
            "--model.n_embd", "32", "--model.block_size", "160", "--model.memory", memory,
            "--model.memory_options", options,
            "--data.train", str(train), "--data.bank", str(bank), "--data.val_fraction", "0.1",
            "--train.batch_size", str(batch_size), "--train.max_steps", str(max_steps),
            "--train.warmup_steps", str(warmup), "--train.eval_every", "3", "--train.eval_batches", "1",
            "--train.save_every", "3", "--train.log_every", str(log_every), "--train.progress", "false",
            *extra, "--out_dir", str(out),
        ]  # fmt: skip

    return args
