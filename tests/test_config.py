"""Run config: YAML load, typed dotted overrides, unknown keys named, YAML round trip."""

import pytest
import yaml

from memlm.config import RunConfig, load_config, parse_overrides, save_config, to_yaml
from memlm.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_values_are_typed(tmp_path):
    path = write(
        tmp_path,
        "model: {n_layer: 2, n_embd: 32, n_head: 2}\n"
        "data: {train: [a.txt], seq_len: 16}\n"
        "train: {lr: 3e-4, betas: [0.8, 0.99], memory_lr: null}\n"
        "out_dir: runs/x\n",
    )
    cfg = load_config(path)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.model.n_layer == 2 and cfg.model.head_dim == 16
    assert cfg.data.train == ["a.txt"] and cfg.out_dir == "runs/x"


def test_overrides_typed_by_field(tmp_path):
    path = write(tmp_path, "train: {lr: 0.1}\n")
    cfg = load_config(
        path,
        [
            "--train.lr", "3e-4",
            "--model.n_layer=3",
            "--train.memory_lr", "1e-3",
            "--train.progress", "false",
            "--data.train", "a.txt,b.jsonl",
            "--data.tokenizer", "none",
            "--model.memory", "rag",
            "--model.memory_options.k", "8",
            "--train.betas", "[0.9, 0.999]",
        ],
    )  # fmt: skip
    assert cfg.train.lr == 3e-4 and cfg.model.n_layer == 3 and cfg.train.memory_lr == 1e-3
    assert cfg.train.progress is False
    assert cfg.data.train == ["a.txt", "b.jsonl"] and cfg.data.tokenizer is None
    assert cfg.model.memory_options == {"k": 8}
    assert cfg.data.layout == "documents"  # auto: a memory design trains on whole documents
    assert cfg.train.betas == (0.9, 0.999)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--train.lrr", "1"], "'train.lrr' (did you mean 'train.lr'?)"),
        (["--model.memory_options.top_k", "8"], "'model.memory_options.top_k'"),
        (
            ["--model.memory", "rag", "--model.memory_options.kk", "8"],
            "(did you mean 'model.memory_options.k'?)",
        ),
        (["--model.memory", "rag", "--model.memory_options.k", "0"], "k must be >= 1"),
        (["--model.memory", "nope"], "unknown memory design 'nope'"),
        (["--bogus", "1"], "'bogus'"),
        (["--model.n_layers", "1"], "'model.n_layers'"),
        (["--train.max_steps", "1.5"], "'train.max_steps': expected int"),
        (["--train.progress", "maybe"], "'train.progress': expected bool"),
        (["--train.lr"], "has no value"),
        (["train.lr", "1"], "expected --key value"),
        (["--train", "1"], "'train' must be a mapping"),
        (["--train.lr.x", "1"], "'train.lr' is not a section"),
    ],
)
def test_bad_overrides_named(tmp_path, args, words):
    path = write(tmp_path, "train: {lr: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, args)
    assert words in str(info.value)


def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'data.seqlen'"):
        load_config(write(tmp_path, "data: {seqlen: 3}\n"))


def test_validation(tmp_path):
    with pytest.raises(ConfigError, match="block_size"):
        load_config(None, ["--data.seq_len", "999", "--model.block_size", "64"])
    with pytest.raises(ConfigError, match="dtype"):
        load_config(None, ["--train.dtype", "fp16"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip(tmp_path):
    cfg = load_config(
        None, ["--model.n_layer", "2", "--train.betas", "0.8,0.9", "--data.val_fraction", "0.1"]
    )
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load(to_yaml(cfg))["train"]["betas"] == [0.8, 0.9]
    assert load_config(None) == RunConfig()


def test_parse_overrides():
    assert parse_overrides(["--a.b", "1", "--c=2"]) == [("a.b", "1"), ("c", "2")]


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("train: {lr: -0.001}\n", "train.lr"),
        ("train: {memory_lr: 0}\n", "train.memory_lr"),
        ("train: {warmup_steps: -5}\n", "train.warmup_steps"),
        ("train: {betas: [0.9, 1.5]}\n", "train.betas"),
        ("train: {min_lr_ratio: 2}\n", "train.min_lr_ratio"),
        ("train: {device: gpu}\n", "train.device"),
        ("model: {dropout: 1.0}\n", "model.dropout"),
        ("model: {n_layer: 0}\n", "model.n_layer"),
        ("data: {seq_len: 0}\n", "data.seq_len"),
    ],
)
def test_ranges_checked_at_load_naming_file_and_key(tmp_path, yaml_text, key):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {key} must")
