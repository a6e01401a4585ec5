"""The one reading path: what a memory design needs from the bank, built per batch.

The trainer calls :meth:`MemoryReader.train_batch` on each batch of documents, the generator calls
:meth:`MemoryReader.prompts` on each batch of prompts (and installs :meth:`MemoryReader.step_hook` when the
design reads again during decoding), and QA evaluation goes through the generator. None of them knows which
design it drives: a design overrides these methods, and the backbone reads what they put in the
:class:`~memlm.model.memory.MemoryContext`.

This base class is the reader of a model without memory (the dense baseline on document-aligned samples):
``BOS doc EOS``, every token but BOS a target.

Causality (``../shared/DESIGN.md``): what a training position reads from memory depends only on earlier
tokens. A reader that retrieves with a *query* built from a document's prefix must take no loss on the query
tokens; :class:`TrainBatch` reports each row's ``query_len`` so tests can check exactly that.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from memlm.data.pack import IGNORE_INDEX

if TYPE_CHECKING:
    from memlm.bank.store import MemoryBank
    from memlm.generate import StepHook
    from memlm.model.memory.base import MemoryContext
    from memlm.tokenizer import Tokenizer


@dataclass
class TrainBatch:
    input_ids: Tensor  # (B, T), right-padded with PAD
    targets: Tensor  # (B, T), already shifted; -100 where no loss is taken (memory, query, padding)
    memory: MemoryContext | None = None
    query_len: list[int] = field(default_factory=list)  # per row: tokens [0, query_len) feed retrieval
    used: list[list[int]] = field(default_factory=list)  # per row: bank entry ids the sample reads

    def to(self, device: torch.device) -> TrainBatch:
        self.input_ids = self.input_ids.to(device, non_blocking=True)
        self.targets = self.targets.to(device, non_blocking=True)
        if self.memory is not None and hasattr(self.memory.inputs, "to"):
            self.memory.inputs = self.memory.inputs.to(device)
        return self


@dataclass
class PromptBatch:
    """What the generator feeds for a batch of prompts."""

    token_ids: list[list[int]]  # per row, BOS first: memory text (RAG) + the prompt
    memory: MemoryContext | None = None  # handed to the first forward call
    used: list[list[int]] = field(default_factory=list)  # per row: bank entry ids placed before the prompt
    scores: list[list[float]] = field(default_factory=list)
    # The answer's budget in text tokens (set by the generator); a reader that decodes tokens which are not
    # text (LMLM's lookups) ends rows in its hook when their text reaches it. None: no budget but the steps.
    max_text_tokens: int | None = None


class MemoryReader:
    """Feeds a model from a bank. The base class reads nothing: plain documents for a model without memory."""

    skip_special_tokens = True  # LMLM keeps its lookup tokens in the generated text

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, bank: MemoryBank | None = None) -> None:
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.block_size = model.config.block_size
        self.owns_bank = False  # set when the reader opened the bank itself (binding.load_reader)

    # ---- training ------------------------------------------------------------------------------
    def prepare_training(self, texts: Sequence[str], *, progress: bool = False) -> None:
        """Called once before training with every training document (RAG precomputes retrieval here)."""

    def set_step(self, step: int) -> None:
        """The trainer calls this before each step's batches with the step about to run (0-based): a reader
        whose layout depends on training progress (Memory³'s warm-up stage without memory) reads it here.
        It is a function of the step alone, so a resumed run lays out its batches as the uninterrupted one."""

    def train_batch(
        self, texts: Sequence[str], *, rng: random.Random | None = None, train: bool = True
    ) -> TrainBatch:
        """Documents -> one padded batch. ``rng`` drives augmentation (``train=False``: none)."""
        tok = self.tokenizer
        rows = [[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode_batch(list(texts))]
        return self.collate(rows, [1] * len(rows))

    def collate(
        self,
        rows: Sequence[Sequence[int]],
        loss_from: Sequence[int],
        *,
        query_len: Sequence[int] | None = None,
        used: Sequence[Sequence[int]] | None = None,
        memory: MemoryContext | None = None,
    ) -> TrainBatch:
        """Right-pad token rows into (input_ids, targets); token ``i`` of a row is a target only when
        ``i >= loss_from[row]``. Rows longer than ``block_size + 1`` are cut (their tail is lost)."""
        rows = [list(r[: self.block_size + 1]) for r in rows]
        T = max(len(r) for r in rows) - 1
        x = torch.full((len(rows), T), self.tokenizer.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for i, (r, start) in enumerate(zip(rows, loss_from)):
            ids = torch.tensor(r, dtype=torch.long)
            x[i, : len(r) - 1] = ids[:-1]
            first = max(start, 1) - 1  # target position t predicts token t + 1
            y[i, first : len(r) - 1] = ids[first + 1 :]
        return TrainBatch(
            x,
            y,
            memory=memory,
            query_len=list(query_len) if query_len is not None else [0] * len(rows),
            used=[list(u) for u in used] if used is not None else [[] for _ in rows],
        )

    # ---- inference -----------------------------------------------------------------------------
    def prompts(self, prompts: Sequence[str]) -> PromptBatch:
        ids = self.tokenizer.encode_batch(list(prompts), bos=True)
        return PromptBatch(token_ids=ids, used=[[] for _ in ids], scores=[[] for _ in ids])

    def random_token(self, rng: random.Random) -> int:
        """A uniformly random vocabulary id that is never a special token (training noise)."""
        from memlm.tokenizer import SPECIAL_TOKENS

        return rng.randrange(len(SPECIAL_TOKENS), self.tokenizer.vocab_size)

    def cue_noise(
        self, text: str, ids: list[int], first_object: int, subject: str, rng: random.Random, p: float
    ) -> tuple[list[int], list[int]]:
        """``ids`` (BOS text ...) with a share ``p`` of the cue tokens replaced by random ones, and where: the
        tokens after BOS, before ``first_object`` (the index of the first object's first token) and inside the
        first sentence or line, the subject's name kept. A question in words the corpus never uses leaves the
        model such a prompt: the reading learns to follow the entry it read, not the wording (PlugLM's and
        ExplicitLM's ``cue_noise``; the query encoder reads the clean text)."""
        from memlm.model.memory.question import sentence_end

        tok = self.tokenizer
        end = min(first_object, 1 + sentence_end(tok, text, 0))  # a blank first line: no cue words
        keep = set()
        for name in (tok.encode(" " + subject), tok.encode(subject)):  # after a space, or opening the text
            for i in range(1, end - len(name) + 1):
                if ids[i : i + len(name)] == name:
                    keep.update(range(i, i + len(name)))
        out, where = list(ids), []
        for i in range(1, end):
            if i not in keep and rng.random() < p:
                out[i] = self.random_token(rng)
                where.append(i)
        return out, where

    @staticmethod
    def ignore_noised(targets: Tensor, noised: Sequence[tuple[int, list[int]]]) -> None:
        """A random token is no target: for (row, positions) from :meth:`cue_noise`, ignore those targets."""
        T = targets.shape[1]
        for b, where in noised:
            for t in where:
                if 0 < t <= T:
                    targets[b, t - 1] = IGNORE_INDEX

    def decode_steps(self, max_new_tokens: int) -> int:
        """Decoding steps for an answer of ``max_new_tokens`` text tokens: more where a design writes tokens
        that are not answer text (LMLM's lookups), so they do not eat the answer's budget."""
        return max_new_tokens

    def step_hook(self, batch: PromptBatch) -> StepHook | None:
        """A hook the generator runs before every forward call (retrieve every N tokens, look facts up)."""
        return None

    def check_bank(self, namespaces: Sequence[str] | None = None) -> None:
        """Refuse a bank the model cannot read (none, or no entries where it reads): a clear error, never a
        silent fallback to no memory."""
        from memlm.bank.store import BankError

        if self.bank is None:
            raise BankError(f"memory design {self.model.config.memory!r} reads a memory bank; none was given")
        if self.bank.count(namespaces) == 0:
            where = f" in namespaces {list(namespaces)}" if namespaces is not None else ""
            have = ", ".join(f"{k} ({v})" for k, v in self.bank.namespaces().items()) or "none"
            raise BankError(
                f"{self.bank.path}: no entries{where} for the model to read (bank namespaces: {have})"
            )

    def close(self) -> None:
        if self.owns_bank and self.bank is not None:
            self.bank.close()

    def refresh(self) -> int:
        """Bring derived state (indexes, cached artifacts) up to date with the bank's edits; returns how many
        entries were re-derived. Readers also refresh on their own before each retrieval."""
        return 0


def as_in_a_sentence(key_text: str) -> str:
    """A key text as a question or a document spells it: after a space. Byte-level BPE splits a word at the start
    of a string differently ("Sean" -> S|e|an, " Sean" -> one token), so a key tokenised bare would spell its
    subject's first name otherwise than every question does, and the query could not match on it (bare keys:
    a wrong top-1 shared the first name 2% of the time, the one-token middle initial 19%; with the space,
    ExplicitLM's query finds the gold entry for 0.633 of unseen questions, 0.443 before)."""
    return key_text if key_text.startswith(" ") else " " + key_text
