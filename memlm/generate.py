"""Generation with a KV cache: greedy or sampled, batched with left padding, streamed, with step hooks.

A step hook runs before every forward call (the first one before the prompt's). It sees a
:class:`DecodeState` and may change it: replace ``state.memory`` (Memory³ retrieves every N tokens), queue
tokens to feed instead of sampling with ``state.force`` (LMLM pauses at ``<|db_return|>``, looks the fact up,
and resumes with the answer — the cache is kept, the batch goes on), record what it used
(``state.record``), or finish a row. Forced tokens go through the same cached forward as sampled ones, all of a
row's queued tokens in one call (their logits are not needed), so a looked-up value costs one forward.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from memlm.model.gpt import GPT
    from memlm.model.memory import MemoryContext
    from memlm.model.memory.reader import MemoryReader, PromptBatch
    from memlm.tokenizer import Tokenizer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_token_ids: tuple[int, ...] = ()  # in addition to EOS
    seed: int | None = None  # sampling seed; None: torch's global generator


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, a stop token or string) | "length"
    retrieved: list[int] | None = None  # bank entry ids the answer used, in first-use order
    trace: list[dict[str, Any]] = field(default_factory=list)  # the memory design's events (lookups, ...)


@dataclass
class DecodeState:
    """Per-batch decoding state that step hooks read and change."""

    step: int  # forward calls so far (0 before the prompt's); = tokens generated, unless tokens were forced
    tokens: list[list[int]]  # generated tokens per row
    finished: list[bool]
    memory: MemoryContext | None = None  # handed to the model's next forward call
    forced: list[deque[int]] = field(default_factory=list)
    trace: list[list[dict[str, Any]]] = field(default_factory=list)
    retrieved: list[list[int]] = field(default_factory=list)

    def force(self, row: int, token_ids: Sequence[int]) -> None:
        """Feed these tokens next on ``row`` instead of sampling (teacher-forced, cache kept): the first replaces
        the next sampled token, the rest go into the cache with it in the same forward call."""
        self.forced[row].extend(token_ids)

    def record(self, row: int, *, entry_ids: Sequence[int] = (), **event: Any) -> None:
        self.trace[row].append({"step": self.step, **event, "entry_ids": list(entry_ids)})
        self.retrieved[row].extend(i for i in entry_ids if i not in self.retrieved[row])


StepHook = Callable[[DecodeState], None]


def sample_next(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if config.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > config.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def iter_decode(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    pad_id: int,
    eos_id: int,
    hook: StepHook | None = None,
    memory: MemoryContext | None = None,
) -> Iterator[tuple[Tensor, DecodeState]]:
    """Decode a batch; yield ``(next_tokens (B,), state)`` after every step. Finished rows get ``pad_id``."""
    B = len(prompts)
    if B == 0:
        return
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add BOS)")
    L, N = max(len(p) for p in prompts), config.max_new_tokens
    if L + N > model.config.block_size:
        raise ValueError(
            f"prompt ({L} tokens) + max_new_tokens ({N}) exceeds the model's block_size ({model.config.block_size})"
        )
    device = model.device
    # The cache has room beyond L + N: a step that feeds one row several forced tokens feeds the other rows
    # padding in those columns (masked out), so columns can outrun tokens. Positions count real tokens only.
    cap = min(model.config.block_size, L + 2 * N)
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, cap, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at column L - 1
        ids[i, L - len(p) :] = torch.tensor(list(p), device=device)
        mask[i, L - len(p) : L] = 1
    pos = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)
    seen = mask[:, :L].sum(-1)  # real tokens in the cache per row: the next one's position

    state = DecodeState(
        step=0,
        tokens=[[] for _ in range(B)],
        finished=[False] * B,
        memory=memory,
        forced=[deque() for _ in range(B)],
        trace=[[] for _ in range(B)],
        retrieved=[[] for _ in range(B)],
    )
    stop_ids = {eos_id, *config.stop_token_ids}
    gen = None
    if config.seed is not None:
        gen = torch.Generator(device=device).manual_seed(config.seed)

    cache = model.new_cache(B, cap)
    inputs, start = ids, 0
    for step in range(N):
        if hook is not None:
            hook(state)
        width = inputs.shape[1]
        out = model(
            inputs,
            attention_mask=mask[:, : start + width],
            position_ids=pos,
            cache=cache,
            memory=state.memory,
        )
        nxt = sample_next(out.logits[:, -1], config, gen)
        _record_model_retrieval(state, out.retrieval)
        feeds: list[list[int]] = []
        for i in range(B):
            if state.finished[i]:
                nxt[i] = pad_id
                feeds.append([])
                continue
            if state.forced[i]:
                nxt[i] = state.forced[i].popleft()
            feeds.append([int(nxt[i])])
        start += width
        # Forced tokens need no logits but the last one's: they go into the cache in one forward with the token
        # before them (LMLM's value after <|db_return|>), as long as the columns left cover every row's
        # remaining tokens at one per forward.
        extra = [list(state.forced[i])[: N - len(state.tokens[i]) - 1] for i in range(B)]
        wide = 1 + max(map(len, extra))
        need = max((N - len(state.tokens[i]) - 1 - len(extra[i]) for i in range(B) if feeds[i]), default=0)
        if wide > 1 and start + wide + need <= cap:
            for i, more in enumerate(extra):
                for _ in more:
                    state.forced[i].popleft()
                feeds[i] += more
        for i, feed in enumerate(feeds):
            if not feed:
                continue
            state.tokens[i].extend(feed)
            if (feed[-1] in stop_ids and not state.forced[i]) or len(state.tokens[i]) >= N:
                state.finished[i] = True
        state.step = step + 1
        yield nxt, state
        if all(state.finished):
            break
        # Right-aligned feeds: every row's newest token is the last column. A finished row keeps decoding
        # padding (the batch stays rectangular) but nothing attends to it.
        width = max(map(len, feeds))
        inputs = torch.full((B, width), pad_id, dtype=torch.long, device=device)
        pos = seen[:, None].expand(B, width).clone()
        for i, feed in enumerate(feeds):
            if feed and not state.finished[i]:
                inputs[i, width - len(feed) :] = torch.tensor(feed, device=device)
                mask[i, start + width - len(feed) : start + width] = 1
                pos[i, width - len(feed) :] += torch.arange(len(feed), device=device)
                seen[i] += len(feed)


def _record_model_retrieval(state: DecodeState, memory: MemoryContext | None) -> None:
    """Provenance of designs that retrieve inside the model (ExplicitLM, PlugLM): the entries read at the
    position that predicts the next token, i.e. the last position of the call."""
    if memory is None or memory.retrieved_ids is None:
        return
    ids = memory.retrieved_ids
    last = (ids[:, -1] if ids.dim() == 3 else ids).reshape(ids.shape[0], -1).tolist()  # (B, k)
    for i, row in enumerate(last):
        if not state.finished[i]:
            used = [int(e) for e in row if e >= 0]
            if used:
                state.record(i, entry_ids=used, kind="read")


def decode(model: GPT, prompts: Sequence[Sequence[int]], config: GenerationConfig, **kw: Any) -> DecodeState:
    """Run :func:`iter_decode` to the end and return the final state (generated tokens, traces)."""
    state = DecodeState(step=0, tokens=[[] for _ in prompts], finished=[True] * len(prompts))
    for _, state in iter_decode(model, prompts, config, **kw):  # noqa: B007 - the last state is the result
        pass
    return state


class Generator:
    """A model, its tokenizer and its memory reader: text in, :class:`Generation` out (what QA evaluation calls).

    The reader (:mod:`memlm.model.memory.reader`) turns each batch of prompts into what the model is fed (RAG
    puts retrieved entries before the prompt) and may install a step hook (retrieve every N tokens, look a fact
    up). Every :class:`Generation` carries the bank entry ids its answer used (``retrieved``) and the events
    behind them (``trace``). A model without memory gets the plain reader: ``retrieved`` is None; a memory
    model's answer that read nothing has ``retrieved == []`` (a miss, not "no provenance").
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        *,
        reader: MemoryReader | None = None,
        hook_factory: Callable[[], StepHook] | None = None,
    ):
        from memlm.model.memory.reader import MemoryReader

        self.model, self.tokenizer, self.hook_factory = model.eval(), tokenizer, hook_factory
        self.reader = reader if reader is not None else MemoryReader(model, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: str = "cpu",
        bank: str | os.PathLike | None = None,
        memory_options: dict[str, Any] | None = None,
    ) -> Generator:
        """Load a model folder; a memory model reads ``bank`` (default: the bank it was trained with).
        ``memory_options`` override the recorded ones for this reading (e.g. PlugLM ``{"read_top_n": 5}``)."""
        from memlm.model.checkpoint import load_pretrained
        from memlm.model.memory.binding import load_reader

        model, tokenizer = load_pretrained(directory, device=device, memory_options=memory_options)
        return cls(model, tokenizer, reader=load_reader(directory, model, tokenizer, bank=bank))

    def close(self) -> None:
        """Close the bank the reader opened (a bank passed in as an object stays open)."""
        self.reader.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _config(self, max_new_tokens: int, stop_tokens: Sequence[str], **kw: Any) -> GenerationConfig:
        stop_ids = tuple(self.tokenizer.token_id(t) for t in stop_tokens)
        return GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=stop_ids, **kw)

    def _batch(
        self, prompts: Sequence[str], config: GenerationConfig
    ) -> tuple[PromptBatch, GenerationConfig]:
        """The reader's batch for these prompts, and the config to decode it with: ``max_new_tokens`` is the
        answer's text budget; the reader may ask for more steps (LMLM's lookups), as far as block_size allows."""
        batch = self.reader.prompts(prompts)
        batch.max_text_tokens = n = config.max_new_tokens
        room = self.model.config.block_size - max(len(p) for p in batch.token_ids)
        return batch, replace(config, max_new_tokens=max(n, min(self.reader.decode_steps(n), room)))

    def text(self, token_ids: Sequence[int]) -> str:
        """Generated ids -> text; the memory tokens stay when the reader asks (LMLM), PAD/BOS/EOS never do."""
        tok = self.tokenizer
        if self.reader.skip_special_tokens:
            return tok.decode(token_ids)
        drop = {tok.pad_id, tok.bos_id, tok.eos_id}
        return tok.decode([t for t in token_ids if t not in drop], skip_special_tokens=False)

    def _hook(self, batch: PromptBatch, stop: Sequence[str]) -> StepHook:
        """Record the prompt's retrieval, then run the reader's hook, the user's hook and stop strings."""
        hooks = [h for h in (self.reader.step_hook(batch), self.hook_factory and self.hook_factory()) if h]
        # A stop string ends at the newest token when it first appears, and every token is at least one
        # byte, so decoding the last (longest stop in bytes + 1) tokens suffices: O(1) per step, not O(n).
        tail = max((len(s.encode()) for s in stop), default=0) + 1

        def hook(state: DecodeState) -> None:
            if state.step == 0:
                for i, used in enumerate(batch.used):
                    if used:
                        scores = batch.scores[i] if batch.scores else []
                        state.record(i, entry_ids=used, kind="retrieve", scores=scores)
            for i, toks in enumerate(state.tokens):
                if not state.finished[i] and toks and any(s in self.text(toks[-tail:]) for s in stop):
                    state.finished[i] = True
            for h in hooks:
                h(state)

        return hook

    def _through_stop(self, toks: list[int], stop: Sequence[str]) -> list[int]:
        """The shortest prefix of ``toks`` whose text holds a stop string: a row's forced tokens enter in one
        step, so it can hold tokens past the stop that a token-by-token decode would not have produced."""
        lo, hi = 1, len(toks)  # the text of toks[:hi] holds a stop string; "holds" only grows with the prefix
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in self.text(toks[:mid]) for s in stop):
                hi = mid
            else:
                lo = mid + 1
        return toks[:hi]

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 32,
        stop: Sequence[str] = (),
        stop_tokens: Sequence[str] = (),
        batch_size: int = 32,
        **sampling: Any,
    ) -> list[Generation]:
        """Generate for each prompt; ``stop`` strings end a row and are cut from its text.

        ``sampling``: temperature, top_k, top_p, seed (see :class:`GenerationConfig`). Greedy by default.
        """
        config = self._config(max_new_tokens, stop_tokens, **sampling)
        tok = self.tokenizer
        results: list[Generation] = []
        for b in range(0, len(prompts), batch_size):
            chunk = list(prompts[b : b + batch_size])
            batch, steps = self._batch(chunk, config)
            state = decode(
                self.model,
                batch.token_ids,
                steps,
                pad_id=tok.pad_id,
                eos_id=tok.eos_id,
                hook=self._hook(batch, stop),
                memory=batch.memory,
            )
            for i, prompt in enumerate(chunk):
                toks = state.tokens[i]
                text = self.text(toks)
                cut = min((text.index(s) for s in stop if s in text), default=None)
                if cut is not None:
                    toks = self._through_stop(toks, stop)
                stopped = cut is not None or (toks and toks[-1] in {tok.eos_id, *config.stop_token_ids})
                results.append(
                    Generation(
                        prompt=prompt,
                        text=text if cut is None else text[:cut],
                        token_ids=toks,
                        finish_reason="stop" if stopped else "length",
                        retrieved=state.retrieved[i]
                        if state.trace[i] or self.reader.bank is not None
                        else None,
                        trace=state.trace[i],
                    )
                )
        return results

    def stream(
        self, prompt: str, *, max_new_tokens: int = 32, stop_tokens: Sequence[str] = (), **sampling: Any
    ) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece, as it is decoded."""
        config = self._config(max_new_tokens, stop_tokens, **sampling)
        tok = self.tokenizer
        batch, steps = self._batch([prompt], config)
        shown, text = "", ""
        for _, state in iter_decode(
            self.model,
            batch.token_ids,
            steps,
            pad_id=tok.pad_id,
            eos_id=tok.eos_id,
            hook=self._hook(batch, ()),
            memory=batch.memory,
        ):
            text = self.text(state.tokens[0])
            if not text.endswith("\ufffd") and text.startswith(shown):  # wait for a multi-byte char
                yield text[len(shown) :]
                shown = text
        if text != shown and text.startswith(shown):  # what is left, even bytes that never formed a character
            yield text[len(shown) :]
