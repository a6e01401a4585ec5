"""The training loop: one process, or one per device under ``torchrun`` (DDP).

A run is a function of its config: the model is initialised from ``train.seed``, the batch order is a
function of (seed, step) (:mod:`memlm.train.sampler`), the lr of the step (:mod:`memlm.train.schedule`), and
dropout / other training randomness is reseeded from (seed, step, rank) at every step. A run interrupted and
resumed from a checkpoint therefore retraces the uninterrupted run exactly.

The loss of a step is the mean over all counted target tokens of the global batch (targets of -100 are
not counted), however the batch is split over micro-steps and ranks: each micro-batch's mean loss is weighted
by its share of the global token count. So DDP over N processes equals one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import torch
from torch import nn

from memlm.config import RunConfig, save_config
from memlm.data.documents import DocumentDataset, build_document_index
from memlm.data.pack import IGNORE_INDEX, PackedDataset, build_packed, in_val_split
from memlm.data.text import iter_corpus
from memlm.errors import CheckpointError, ConfigError, MemlmError
from memlm.model.memory.reader import MemoryReader, TrainBatch
from memlm.tokenizer import Tokenizer
from memlm.train import distributed
from memlm.train.checkpoint import (
    _save_model,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    load_weights,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from memlm.train.optim import build_optimizer
from memlm.train.rundir import MetricsLog, write_run_info
from memlm.train.sampler import StepBatchSampler
from memlm.train.schedule import lr_factor, set_lr
from memlm.utils.io import atomic_path

# Config keys that do not change the trajectory: a run may resume with other values for these.
# batch_size and grad_accum are replaced by the global batch, so resuming on more devices is allowed.
NOT_TRAJECTORY = {
    "out_dir",
    "data.cache_dir",
    "train.batch_size",
    "train.grad_accum",
    "train.eval_every",
    "train.eval_batches",
    "train.save_every",
    "train.keep_last",
    "train.log_every",
    "train.device",
    "train.num_workers",
    "train.progress",
}


class Trainer:
    """Train ``config.model`` (a :class:`~memlm.model.GPT`, or any ``model``) on ``config.data``.

    ``model(input_ids, targets=targets)`` must return an object with a scalar ``loss`` (mean over targets
    != -100); ``tokenizer`` defaults to ``config.data.tokenizer`` or one trained on the training files.
    """

    def __init__(
        self, config: RunConfig, *, model: nn.Module | None = None, tokenizer: Tokenizer | None = None
    ) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")

    def fit(self, *, resume: bool = False, stop_at: int | None = None) -> dict:
        """Train to ``train.max_steps`` (or stop after step ``stop_at``, as an interruption would).

        ``resume``: continue from the newest checkpoint in ``out_dir`` (from scratch when there is none).
        Returns the last metrics: ``{"step", "loss", "val_loss"}``.
        """
        owns_group = not torch.distributed.is_initialized()
        info, device = distributed.setup(self.config.train.device)
        try:
            return self._fit(info, device, resume=resume, stop_at=stop_at)
        finally:
            if owns_group:
                distributed.teardown()

    # ---- setup ----------------------------------------------------------------------------------
    def _fit(
        self, info: distributed.DistInfo, device: torch.device, *, resume: bool, stop_at: int | None
    ) -> dict:
        cfg, tc = self.config, self.config.train
        existing = list_checkpoints(self.out_dir)
        if existing and not resume:
            raise ConfigError(
                f"{self.out_dir} already holds checkpoints; pass --resume to continue it or choose another out_dir"
            )
        tokenizer = self._tokenizer(info)
        train_ds, val_ds = self._datasets(info, tokenizer)

        model = self.model
        if model is None:
            from memlm.model.gpt import GPT

            torch.manual_seed(tc.seed)  # the same initial weights on every rank and every rerun
            model = GPT(cfg.model)
        model_vocab = getattr(getattr(model, "config", None), "vocab_size", cfg.model.vocab_size)
        if tokenizer.vocab_size > model_vocab:
            raise ConfigError(
                f"tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {model_vocab}"
            )
        model.to(device)
        optimizer = build_optimizer(model, tc)
        reader, memory = self._reader(model, tokenizer)
        if reader is not None:  # e.g. RAG retrieves for every training document once, here
            reader.prepare_training(
                train_ds.texts(range(len(train_ds))), progress=tc.progress and info.is_main
            )

        size = train_ds.n_tokens if isinstance(train_ds, PackedDataset) else len(train_ds)
        trajectory = _trajectory(cfg, info.world_size, tokenizer.fingerprint(), size)
        if memory is not None:
            trajectory["data.bank_fingerprint"] = (memory.get("bank") or {}).get("fingerprint")
        step, ckpt = 0, latest_checkpoint(self.out_dir) if resume else None
        if ckpt is not None:
            state = load_training_state(ckpt)
            _check_same_run(ckpt, state["trajectory"], trajectory)
            load_weights(model, ckpt)
            optimizer.load_state_dict(state["optimizer"])
            restore_rng(state["rng"])
            step = int(state["step"])
        if info.is_main:
            save_config(cfg, self.out_dir / "config.yaml")
            if memory is not None:
                from memlm.model.memory.binding import write_memory_record

                self.out_dir.mkdir(parents=True, exist_ok=True)
                write_memory_record(self.out_dir, memory)
            write_run_info(
                self.out_dir,
                world_size=info.world_size,
                device=str(device),
                resumed_from=step if ckpt else None,
            )
            if ckpt is None:
                self.metrics.path.unlink(missing_ok=True)  # leftovers of a run that never checkpointed
            else:
                self.metrics.truncate_after(step)
        distributed.barrier()

        self.model, self.tokenizer, self.reader, self.memory = model, tokenizer, reader, memory
        return self._loop(model, optimizer, train_ds, val_ds, info, device, step, trajectory, stop_at)

    def _reader(self, model: nn.Module, tokenizer: Tokenizer) -> tuple[MemoryReader | None, dict | None]:
        """The memory design's reader (documents layout) and the record of the bank it reads, or None."""
        cfg = self.config
        if cfg.data.layout != "documents":
            return None, None
        from memlm.model.memory.binding import memory_record
        from memlm.model.memory.registry import get_memory_design

        design = get_memory_design(cfg.model.memory)
        bank = None
        if design.uses_bank:
            if not cfg.data.bank:
                raise ConfigError(
                    f"model.memory={design.name!r} reads a memory bank: set data.bank to its folder"
                )
            from memlm.bank.store import MemoryBank

            bank = MemoryBank.open(cfg.data.bank)
        elif cfg.data.bank:
            raise ConfigError(f"data.bank is set but model.memory={design.name!r} reads no bank")
        reader = design.reader(model, tokenizer, bank)
        return reader, memory_record(design.name, bank) if design.uses_bank else None

    def _tokenizer(self, info: distributed.DistInfo) -> Tokenizer:
        data = self.config.data
        if self.tokenizer is not None:
            return self.tokenizer
        if data.tokenizer is not None:
            return Tokenizer.load(data.tokenizer)
        tok_dir = self.out_dir / "tokenizer"
        _on_main(info, lambda: _train_tokenizer(self.config, tok_dir))
        return Tokenizer.load(tok_dir)

    def _datasets(self, info, tokenizer: Tokenizer):
        """(train, val | None): packed token windows, or documents one per sample (``data.layout``)."""
        data = self.config.data
        if not data.train:
            raise ConfigError("data.train lists no training files")
        cache = Path(data.cache_dir) if data.cache_dir else self.out_dir / "data"
        annotate = None
        if data.annotation == "lmlm":
            try:
                from memlm.data.annotate import annotate_ids
            except ImportError as err:
                raise ConfigError(f"data.annotation=lmlm needs memlm.data.annotate ({err})") from err
            annotate = annotate_ids
        frac = data.val_fraction if not data.val else 0.0
        # (split name, files, document filter); the tag puts the split and annotation into the cache key.
        splits = [("train", data.train, (lambda t: not in_val_split(t, frac)) if frac else None)]
        if data.val:
            splits.append(("val", data.val, None))
        elif frac:
            splits.append(("val", data.train, lambda t: in_val_split(t, frac)))

        docs = data.layout == "documents"

        def build() -> None:
            for name, files, select in splits:
                if docs:  # one document per sample: an offset index, tokenised per batch by the reader
                    build_document_index(files, cache / f"docs_{name}", select=select, tag=f"{name}|{frac}")
                    continue
                build_packed(
                    files,
                    cache / name,
                    tokenizer,
                    annotate=annotate,
                    select=select,
                    tag=f"{name}|{frac}|{data.annotation}",
                    progress=self.config.train.progress,
                )

        _on_main(info, build)
        has_val = bool(data.val or frac)
        if docs:
            val_docs = DocumentDataset(cache / "docs_val") if has_val else None
            return DocumentDataset(cache / "docs_train"), val_docs
        train_ds = PackedDataset(cache / "train", data.seq_len)
        return train_ds, PackedDataset(cache / "val", data.seq_len) if has_val else None

    # ---- training -------------------------------------------------------------------------------
    def _loop(self, model, optimizer, train_ds, val_ds, info, device, step, trajectory, stop_at) -> dict:
        tc = self.config.train
        raw = model
        if info.enabled:
            model = nn.parallel.DistributedDataParallel(
                raw, device_ids=[device.index] if device.type == "cuda" else None
            )
        sampler = StepBatchSampler(
            len(train_ds),
            seed=tc.seed,
            batch_size=tc.batch_size,
            grad_accum=tc.grad_accum,
            rank=info.rank,
            world_size=info.world_size,
            start_step=step,
            end_step=tc.max_steps,
        )
        docs = isinstance(train_ds, DocumentDataset)
        if docs:  # documents: the reader tokenises and lays out each batch (retrieval, memory, masks)
            indices = iter(sampler)
        else:
            loader = torch.utils.data.DataLoader(
                train_ds, batch_sampler=sampler, num_workers=tc.num_workers, pin_memory=device.type == "cuda"
            )
            windows = iter(loader)
        end = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
        last = {"step": step, "loss": None, "val_loss": None}

        from tqdm import tqdm

        bar = tqdm(
            total=tc.max_steps,
            initial=step,
            unit="step",
            disable=not (info.is_main and tc.progress),
            dynamic_ncols=True,
        )
        clock, tokens_since = time.perf_counter(), 0
        loss_since, steps_since = torch.zeros((), device=device), 0
        aux_since: dict[str, torch.Tensor] = {}  # a design's auxiliary losses (in the loss too), logged apart
        model.train()
        while step < end:
            seed = _step_seed(tc.seed, step, info.rank)
            torch.manual_seed(seed)
            if docs:
                self.reader.set_step(step)
                # Augmentation (RAG's swaps) is a function of (seed, step, rank, micro): resume stays exact.
                micro = [
                    self.reader.train_batch(train_ds.texts(next(indices)), rng=random.Random(seed * 31 + a))
                    for a in range(tc.grad_accum)
                ]
            else:
                micro = [TrainBatch(*next(windows)) for _ in range(tc.grad_accum)]
            counts = [int((b.targets != IGNORE_INDEX).sum()) for b in micro]
            n_global = distributed.all_reduce_sum(torch.tensor(float(sum(counts)), device=device)).item()
            loss_sum = torch.zeros((), device=device)
            for i, batch in enumerate(micro):
                batch.to(device)
                sync = model.no_sync() if info.enabled and i < len(micro) - 1 else contextlib.nullcontext()
                with sync:
                    with _autocast(device, tc.dtype):
                        out = model(batch.input_ids, targets=batch.targets, **_memory_kw(batch))
                    # Weight by this micro-batch's share of the global token count; DDP then averages
                    # over ranks, hence the world_size factor.
                    loss = out.loss * (counts[i] * info.world_size / max(n_global, 1.0))
                    loss.backward()
                loss_sum += loss.detach()
                for name, value in (out.retrieval.aux_losses if out.retrieval is not None else {}).items():
                    aux_since[name] = aux_since.get(name, 0.0) + value.detach() / len(micro)
                tokens_since += batch.input_ids.numel()
            factor = lr_factor(
                step, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps, min_ratio=tc.min_lr_ratio
            )
            set_lr(optimizer, factor)
            max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_since += loss_sum
            steps_since += 1
            bar.update(1)

            if step % tc.log_every == 0 or step == tc.max_steps:
                # the mean loss of the steps since the last line, not just the last step's
                loss_value = distributed.all_reduce_sum(loss_since).item() / info.world_size / steps_since
                elapsed = time.perf_counter() - clock
                tokens = distributed.all_reduce_sum(torch.tensor(float(tokens_since), device=device)).item()
                record = {
                    "kind": "train",
                    "step": step,
                    "loss": loss_value,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens / max(elapsed, 1e-9),
                    # "lr" for the backbone, "lr_memory" when the model has memory parameters
                    **{
                        "lr" if g["name"].startswith("backbone") else "lr_memory": g["lr"]
                        for g in optimizer.param_groups
                    },
                }
                if aux_since:  # rank 0's mean over the steps since the last line
                    record["aux_losses"] = {k: float(v) / steps_since for k, v in sorted(aux_since.items())}
                clock, tokens_since = time.perf_counter(), 0
                loss_since, steps_since, aux_since = torch.zeros((), device=device), 0, {}
                last.update(step=step, loss=loss_value)
                if info.is_main:
                    self.metrics.write(record)
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            if val_ds is not None and tc.eval_every and (step % tc.eval_every == 0 or step == tc.max_steps):
                val_loss = evaluate(
                    raw,
                    val_ds,
                    batch_size=tc.batch_size,
                    n_batches=tc.eval_batches,
                    info=info,
                    device=device,
                    dtype=tc.dtype,
                    reader=self.reader,
                )
                last["val_loss"] = val_loss
                if info.is_main:
                    self.metrics.write({"kind": "eval", "step": step, "val_loss": val_loss})
                    if tc.progress:
                        bar.write(f"step {step}: val_loss {val_loss:.4f}")
            if (tc.save_every and step % tc.save_every == 0) or step == tc.max_steps:
                if info.is_main:
                    save_checkpoint(
                        checkpoint_dir(self.out_dir, step),
                        model=raw,
                        optimizer=optimizer,
                        step=step,
                        trajectory=trajectory,
                        tokenizer=self.tokenizer,
                        memory=self.memory,
                    )
                    prune_checkpoints(self.out_dir, tc.keep_last)
                distributed.barrier()
        bar.close()
        if step == tc.max_steps and info.is_main:
            with atomic_path(self.out_dir / "final") as tmp:
                _save_model(raw, tmp, self.tokenizer, self.memory)
        distributed.barrier()
        return last


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: PackedDataset | DocumentDataset,
    *,
    batch_size: int,
    n_batches: int,
    info: distributed.DistInfo,
    device: torch.device,
    dtype: str = "auto",
    reader: MemoryReader | None = None,
) -> float:
    """Token-weighted mean loss over the first ``n_batches * batch_size * world_size`` samples of
    ``dataset`` — the same ones at every evaluation, so values are comparable across steps. Documents go
    through ``reader`` (its memory, no augmentation)."""
    was_training = model.training
    model.eval()
    n_seq = min(len(dataset), n_batches * batch_size * info.world_size)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * tokens, tokens)
    for start in range(info.rank * batch_size, n_seq, batch_size * info.world_size):
        idx = range(start, min(start + batch_size, n_seq))
        if isinstance(dataset, DocumentDataset):
            batch = reader.train_batch(dataset.texts(idx), train=False)
        else:
            items = [dataset[i] for i in idx]
            batch = TrainBatch(torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]))
        batch.to(device)
        with _autocast(device, dtype):
            loss = model(batch.input_ids, targets=batch.targets, **_memory_kw(batch)).loss.double()
        n = (batch.targets != IGNORE_INDEX).sum()
        sums += torch.stack([loss * n, n.double()])
    distributed.all_reduce_sum(sums)
    model.train(was_training)
    return (sums[0] / sums[1].clamp(min=1)).item()


def _memory_kw(batch: TrainBatch) -> dict:
    """Pass ``memory=`` only when there is some, so models without a memory argument keep working."""
    return {"memory": batch.memory} if batch.memory is not None else {}


# ---- helpers ------------------------------------------------------------------------------------


def _autocast(device: torch.device, policy: str):
    """bf16 autocast on CUDA (``auto``) or when asked; fp32 otherwise. Weights and optimizer stay fp32."""
    if policy == "bf16" or (policy == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + rank


def _on_main(info: distributed.DistInfo, work) -> None:
    """Run ``work`` on rank 0 only, and fail on every rank if it fails, so that no rank waits forever at
    a barrier for a rank that already raised."""
    error: MemlmError | None = None
    if info.is_main:
        try:
            work()
        except MemlmError as err:
            error = err
    message = distributed.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise MemlmError(f"rank 0 failed: {message}")


def _train_tokenizer(cfg: RunConfig, tok_dir: Path) -> None:
    """Train BPE of ``model.vocab_size`` on the training documents, once per run directory."""
    if (tok_dir / "tokenizer.json").is_file():
        return
    frac = cfg.data.val_fraction if not cfg.data.val else 0.0
    texts = (t for t in iter_corpus(cfg.data.train) if not (frac and in_val_split(t, frac)))
    tokenizer = Tokenizer.train(texts, vocab_size=cfg.model.vocab_size)
    with atomic_path(tok_dir) as tmp:
        tokenizer.save(tmp)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "memory_options":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _trajectory(cfg: RunConfig, world_size: int, tokenizer_fp: str, n_train_tokens: int) -> dict:
    """The config values that determine the run's trajectory, as JSON-comparable dotted keys."""
    flat = {k: v for k, v in _flatten(cfg.to_dict()).items() if k not in NOT_TRAJECTORY}
    flat["train.global_batch"] = cfg.train.batch_size * cfg.train.grad_accum * world_size
    flat["data.tokenizer_fingerprint"] = tokenizer_fp
    flat["data.train_tokens"] = n_train_tokens
    return json.loads(json.dumps(flat, sort_keys=True))


def recipe_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """``key: old -> new`` for every config value that changes what training computes (not where it logs)."""
    ignore = NOT_TRAJECTORY - {"train.batch_size", "train.grad_accum"}  # on one device, these are the batch
    a, b = ({k: v for k, v in _recipe(c).items() if k not in ignore} for c in (old, new))
    return _changes(a, b)


def _recipe(cfg: RunConfig) -> dict:
    """Flattened config, memory options parsed by their design (a default spelled out is the same recipe, and a
    changed option is named on its own: ``model.memory_options.cue_noise: 0.0 -> 0.5``)."""
    flat = _flatten(cfg.to_dict())
    if cfg.model.memory:
        from memlm.model.memory import get_memory_design
        from memlm.model.memory.base import parse_options

        try:
            design = get_memory_design(cfg.model.memory)
        except (KeyError, ConfigError):  # not registered here: compared as written
            return flat
        options = parse_options(design.options_class, cfg.model.memory_options, design=cfg.model.memory)
        del flat["model.memory_options"]
        flat.update({f"model.memory_options.{k}": v for k, v in vars(options).items()})
    return flat


def _changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every key whose value differs, sorted by key."""
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]


def _check_same_run(ckpt: Path, old: dict, new: dict) -> None:
    diff = _changes(old, new)
    if diff:
        changes = "; ".join(diff[:6])
        raise CheckpointError(
            f"{ckpt} was saved by a run with another config ({changes}); resume with the original config "
            "or choose another out_dir"
        )
