"""Training checkpoints: a model folder plus the state needed to continue exactly.

``<out_dir>/checkpoints/step_0000500/`` holds what ``model.save_pretrained`` writes (safetensors weights,
config.json, tokenizer, fingerprint — loadable by ``GPT.from_pretrained``) and ``training_state.pt``:
optimizer state, step, the run's trajectory config and RNG states, all plain tensors and containers so that
``torch.load(..., weights_only=True)`` reads it (never arbitrary pickle). The learning-rate schedule and
the data position are functions of the step, so the step is their whole state. Each folder is written
atomically; only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from memlm.errors import CheckpointError
from memlm.utils.io import atomic_path

STATE_FILE = "training_state.pt"
FORMAT = 1


def checkpoint_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    trajectory: dict,
    tokenizer=None,
    memory: dict | None = None,
) -> Path:
    """Write one checkpoint folder atomically (a crash mid-save leaves no half folder for resume to find)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        _save_model(model, tmp, tokenizer, memory)
        state = {
            "format": FORMAT,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "trajectory": json.dumps(trajectory, sort_keys=True),
            "rng": _rng_state(),
        }
        torch.save(state, tmp / STATE_FILE)
    return path


def _save_model(model: nn.Module, directory: Path, tokenizer, memory: dict | None = None) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory, tokenizer=tokenizer, memory=memory)
        return
    # Any nn.Module (tests, experiments): bare safetensors weights, shared tensors stored once.
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save(directory)


def load_training_state(path: str | os.PathLike) -> dict:
    file = Path(path) / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{file}: cannot read training state ({err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a memlm training state (format {FORMAT})")
    state["trajectory"] = json.loads(state["trajectory"])
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load ``model.safetensors`` into ``model`` in place (safetensors only: loading runs no code).

    Tied weights are saved once; a key missing from the file is accepted only when it shares storage
    with a key that was loaded. When the folder has a ``fingerprint.json`` (every memlm model folder), the
    weights must hash to it: a checkpoint damaged on disk is refused, not resumed from.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from memlm.model.checkpoint import FINGERPRINT_FILE, _hash_state

    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: corrupt or not a safetensors file ({err})") from err
    fp_path = Path(path) / FINGERPRINT_FILE
    if fp_path.is_file():
        try:
            recorded = json.loads(fp_path.read_text())["weights_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{fp_path}: unreadable ({err})") from err
        if _hash_state(state) != recorded:
            raise CheckpointError(f"{file}: weights do not match {FINGERPRINT_FILE} (corrupt or modified)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    really_missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    if really_missing or unexpected:
        raise CheckpointError(
            f"{file}: weights do not fit the model (missing {really_missing[:5]}, unexpected {unexpected[:5]})"
        )


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (``keep_last <= 0`` keeps everything)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    """Python, numpy and torch RNG states as weights_only-loadable values (no numpy objects)."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
