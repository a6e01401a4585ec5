"""Model checkpoints as folders: ``model.safetensors``, ``config.json``, ``tokenizer.json``, ``fingerprint.json``.

Weights load from safetensors only (never pickle). The fingerprint is a hash of the weights; memory
artifacts (vectors, Memory³ key/values) are keyed by it, so a new checkpoint invalidates what the old one
produced (Memory³, Remark 9). Loading re-hashes the weights and refuses a folder whose weights do not
match its fingerprint, whose config is from another architecture, or whose tensors do not fit the config.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from memlm import __version__
from memlm.errors import CheckpointError
from memlm.model.config import ModelConfig
from memlm.utils.io import atomic_path

WEIGHTS_FILE, CONFIG_FILE, FINGERPRINT_FILE = "model.safetensors", "config.json", "fingerprint.json"


def _state_to_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as wte.weight; safetensors refuses shared storage
    return {k: v.detach().contiguous() for k, v in state.items()}


def _hash_state(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    return _hash_state(_state_to_save(model))


def save_pretrained(
    model: torch.nn.Module, directory: str | os.PathLike, *, tokenizer=None, memory: dict | None = None
) -> Path:
    """Write the folder atomically: a crash mid-save leaves the previous folder (or none), never half of one.

    ``memory``: the memory record (design and training bank, :mod:`memlm.model.memory.binding`).
    """
    from safetensors.torch import save_file

    from memlm.model.config import ARCH

    directory = Path(directory)
    state = _state_to_save(model)
    fingerprint = {"weights_sha256": _hash_state(state), "memlm_version": __version__}
    if tokenizer is not None:
        fingerprint["tokenizer"] = tokenizer.fingerprint()
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        save_file({k: v.cpu() for k, v in state.items()}, str(tmp / WEIGHTS_FILE), metadata={"arch": ARCH})
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if memory is not None:
            from memlm.model.memory.binding import write_memory_record

            write_memory_record(tmp, memory)
    return directory


def read_config(
    directory: str | os.PathLike, *, memory_options: Mapping[str, Any] | None = None
) -> ModelConfig:
    """``config.json``; ``memory_options`` override the design's recorded options (inference settings such
    as PlugLM's ``read_top_n``), checked like the recorded ones: an unknown key or a bad value is refused."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: missing (is {directory} a memlm model folder?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if memory_options:
        data["memory_options"] = {**(data.get("memory_options") or {}), **memory_options}
    try:
        return ModelConfig.from_dict(data, source=str(path))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from err


def load_model(
    directory: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    verify: bool = True,
    memory_options: Mapping[str, Any] | None = None,
):
    """Build the model from ``config.json`` (``memory_options``: see ``read_config``) and load its safetensors
    weights; see the module docstring."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from memlm.model.gpt import GPT

    directory = Path(directory)
    config = read_config(directory, memory_options=memory_options)
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        raise CheckpointError(f"{weights}: missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: corrupt or not a safetensors file ({err})") from err

    model = GPT(config)
    expected = _state_to_save(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {keys[:5]}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise CheckpointError(
            f"{weights}: weights do not match {CONFIG_FILE} (from another model?) — {detail}"
        )
    if verify:
        fp_path = directory / FINGERPRINT_FILE
        try:
            recorded = json.loads(fp_path.read_text())["weights_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{fp_path}: missing or unreadable ({err})") from err
        if _hash_state(state) != recorded:
            raise CheckpointError(f"{weights}: weights do not match {FINGERPRINT_FILE} (corrupt or modified)")
    model.load_state_dict(state, strict=not config.tie_embeddings)
    return model.to(device).eval()


def load_pretrained(
    directory: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    memory_options: Mapping[str, Any] | None = None,
):
    """Model and tokenizer from one folder: ``(GPT, Tokenizer)``."""
    from memlm.tokenizer import Tokenizer

    return load_model(directory, device=device, memory_options=memory_options), Tokenizer.load(directory)
