"""The run directory's records: resolved config, provenance (git commit, versions), metrics as JSONL.

Config and provenance are written atomically. Metrics are appended one flushed line at a time; on resume
the lines past the checkpoint's step are dropped (atomically), so a resumed run's metrics.jsonl reads as
if the run had never stopped.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from memlm import __version__
from memlm.utils.io import atomic_path, write_json


def git_commit() -> dict:
    """Commit and dirty flag of the checkout memlm runs from; empty when it is not a git checkout."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": bool(status.strip())}


def write_run_info(
    out_dir: str | os.PathLike, *, world_size: int, device: str, resumed_from: int | None
) -> None:
    info = {
        **git_commit(),
        "memlm_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "command": sys.argv,
        "world_size": world_size,
        "device": device,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from_step": resumed_from,
    }
    write_json(Path(out_dir) / "run.json", info)


class MetricsLog:
    """Append-only JSONL of training and evaluation records."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [
            json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step``: they belong to the part of a run that resume repeats."""
        if not self.path.is_file():
            return
        keep = [r for r in self.read() if r.get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep), encoding="utf-8")
