"""Run configuration: typed dataclasses, loaded from YAML, overridden with dotted ``--key value`` pairs.

A run is ``RunConfig(model, data, train, out_dir)``. Values from a YAML file and from the command line go
through the same coercion, driven by the dataclass field types, so ``lr: 3e-4`` (a string to YAML 1.1)
and ``--train.lr 3e-4`` both become floats, and a key that no dataclass declares is a ``ConfigError``
naming it. Relative paths are relative to the working directory, not to the config file.
``to_yaml(cfg)`` loads back to an equal config.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memlm.errors import ConfigError
from memlm.model.config import ARCH, ModelConfig
from memlm.utils.io import atomic_path


@dataclass
class TrainConfig:
    lr: float = 3e-4  # peak learning rate of the backbone
    memory_lr: float | None = None  # peak lr of memory parameters; None: same as lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    weight_decay: float = 0.1  # on matrices only; norms, biases and other 1-D params get none
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100  # linear warm-up from 0
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per process per micro-step; global batch = this * grad_accum * world
    grad_accum: int = 1  # micro-steps per optimizer step
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_every: int = 200  # steps between validation passes; 0 disables
    eval_batches: int = 20  # batches per validation pass (always the same ones)
    save_every: int = 500  # steps between checkpoints; 0: only the final one
    keep_last: int = 3  # checkpoints kept; older ones are deleted
    log_every: int = 10  # steps between metrics lines
    seed: int = 1337  # fixes init, batch order and dropout: a run is a function of its config
    device: str = "auto"  # auto: cuda when available (one GPU per process under torchrun), else cpu
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or force "fp32" / "bf16"
    num_workers: int = 0  # DataLoader worker processes; 0 loads in the training process
    progress: bool = True  # tqdm bar with loss and tokens/s (rank 0 only)

    def __post_init__(self) -> None:
        # checked here, when the config loads: a bad value must not reach PyTorch after the run folder exists
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_batches", "keep_last"):
            at_least("train", name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "save_every", "num_workers", "weight_decay", "grad_clip"):
            at_least("train", name, getattr(self, name), 0)
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.memory_lr is not None and not self.memory_lr > 0:
            raise ConfigError(f"train.memory_lr must be > 0 (or null: same as lr), got {self.memory_lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must both be in [0, 1), got {list(self.betas)}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # .txt (one document per line) or .jsonl ({"text": ...})
    val: list[str] = field(default_factory=list)  # held-out files; empty: split val_fraction off train
    val_fraction: float = 0.0  # share of train documents held out (by content hash) when val is empty
    seq_len: int = 128  # tokens per training window
    tokenizer: str | None = None  # folder or tokenizer.json; None: train BPE of model.vocab_size on train
    annotation: str = "none"  # "lmlm": texts carry LMLM lookups; looked-up values are masked from the loss
    cache_dir: str | None = None  # packed token files; None: <out_dir>/data
    # packed: windows of seq_len cut anywhere (dense pretraining); documents: one document per sample, as
    # memory designs need (retrieval per document); auto: documents when model.memory is not "none".
    layout: str = "auto"
    bank: str | None = None  # memory bank folder the model reads (memory designs); recorded in checkpoints

    def __post_init__(self) -> None:
        if self.annotation not in ("none", "lmlm"):
            raise ConfigError(f"data.annotation must be none or lmlm, got {self.annotation!r}")
        if self.layout not in ("auto", "packed", "documents"):
            raise ConfigError(f"data.layout must be auto, packed or documents, got {self.layout!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be >= 1, got {self.seq_len}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/default"  # run directory: config, metrics, checkpoints, final model

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.block_size:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.block_size={self.model.block_size}"
            )
        if self.data.layout == "auto":
            self.data.layout = "packed" if self.model.memory == "none" else "documents"
        if self.model.memory != "none" and self.data.layout == "packed":
            raise ConfigError(
                f"model.memory={self.model.memory!r} trains on whole documents: data.layout must be documents"
            )

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def at_least(section: str, name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{section}.{name} must be >= {low}, got {value}")


# ---- loading ------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or start from defaults), apply ``--dotted.key value`` overrides, type-check all."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        for key, value in parse_overrides(overrides or []):
            _set_dotted(raw, key, value)
        return from_dict(RunConfig, raw)
    except ConfigError as err:
        if path is None:
            raise
        # name the file: "configs/x.yaml: train.lr must be > 0, got -1.0" (overrides are applied to it)
        raise ConfigError(f"{path}: {err}") from None


class _Raw(str):
    """A command-line value: still text, parsed by the type of the field it lands in."""


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--train.lr", "3e-4", "--model.n_layer=2"]`` -> ``[("train.lr", "3e-4"), ("model.n_layer", "2")]``."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, _Raw(value)))
    return pairs


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{'.'.join(parents[: i + 1])}' is not a section")
        node = child
    node[leaf] = value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts, coercing each value to its field's type."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    data = dict(data)
    if cls is ModelConfig and data.get("arch", ARCH) == ARCH:
        data.pop("arch", None)  # written by ModelConfig.to_dict; another arch falls through as unknown
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))
        if is_null and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        errors = []
        for arm in arms:
            try:
                return _coerce(value, arm, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if tp is Any:
        return yaml.safe_load(value) if isinstance(value, _Raw) else value
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if tp is int:
            if isinstance(value, (bool, float)):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list, bool)) or value is None:
                raise ValueError
            return str(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                parsed = yaml.safe_load(value)
                value = (
                    parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
                )
            if not isinstance(value, (list, tuple)):
                raise ValueError
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ValueError
                return tuple(_coerce(v, a, key) for v, a in zip(value, args))
            item = args[0] if args else Any
            out = [_coerce(v, item, key) for v in value]
            return tuple(out) if origin is tuple else out
        if origin is dict:
            if isinstance(value, _Raw):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): (yaml.safe_load(v) if isinstance(v, _Raw) else v) for k, v in value.items()}
    except ConfigError:
        raise  # from a nested dataclass: its message names the key that is wrong
    except (TypeError, ValueError, yaml.YAMLError):
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}") from None
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


# ---- saving -------------------------------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(to_yaml(cfg), encoding="utf-8")
