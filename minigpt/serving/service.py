"""What the HTTP routes call: prompts to token ids (checked against the model), requests to
engine rows, the rows' events as an async stream, and the playground's attention maps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import tiktoken
import torch

from ..errors import ConfigError
from ..generation import SamplingConfig, check
from ..inspection import attention_maps, token_labels
from ..model import GPTModel
from ..tokenizer import EOS_ID, EOS_TOKEN
from .engine import Engine
from .rows import Event, Row, RowSpec
from .schemas import Limits, Request

DISCONNECT_CHECK = 0.5  # seconds between looks at whether the client is still there


@dataclass
class Encoded:
    """A request's prompts as token ids, and the rows to decode (prompt-major, `n` per prompt)."""

    prompts: list[list[int]]
    specs: list[RowSpec]


class Service:
    """The model being served, its engine and limits."""

    def __init__(self, model: GPTModel, tokenizer: tiktoken.Encoding, name: str, limits: Limits | None = None,
                 max_batch: int = 8, api_key: str | None = None) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.limits, self.api_key = limits or Limits(), api_key
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_waiting=4 * self.limits.max_rows)
        self.eos_id = EOS_ID if EOS_ID < model.cfg.vocab_size else None

    def encode(self, prompt: str | list[int], i: int = 0) -> list[int]:
        """A prompt's token ids (an empty text starts from EOS, as GPT-2 does), checked against the model."""
        ids = self.tokenizer.encode(prompt, allowed_special={EOS_TOKEN}) if isinstance(prompt, str) else prompt
        ids = ids or [EOS_ID]
        context = self.model.cfg.context_length
        if len(ids) > context:
            raise ConfigError(f"prompt {i} is {len(ids)} tokens, {len(ids) - context} more than the model's "
                              f"context of {context}")
        self.model.check_token_ids(torch.tensor([ids]))
        return ids

    def rows(self, req: Request) -> Encoded:
        """The engine rows of a checked request; `max_tokens` is cut to what the context leaves."""
        check(req.max_tokens or 0, SamplingConfig(req.temperature, req.top_k, req.top_p), self.model.cfg.vocab_size)
        prompts = [self.encode(p, i) for i, p in enumerate(req.prompts)]
        context = self.model.cfg.context_length
        specs = []
        for ids in prompts:
            room = context - len(ids) + 1  # the last position's logits still give one token
            for j in range(req.n):
                seed = None if req.seed is None else req.seed + j
                specs.append(RowSpec(ids, min(req.max_tokens if req.max_tokens is not None else room, room),
                                     req.temperature, req.top_k, req.top_p, seed, req.stop, req.logprobs,
                                     self.eos_id, prompt_logprobs=req.echo and req.logprobs is not None))
        return Encoded(prompts, specs)

    def submit(self, specs: list[RowSpec]) -> tuple[list[Row], asyncio.Queue] | None:
        """Queue the rows; their events arrive on the returned queue. None when the server is full."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        rows = self.engine.submit(specs, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        return None if rows is None else (rows, queue)

    @staticmethod
    async def events(rows: list[Row], queue: asyncio.Queue,
                     disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[Event]:
        """The rows' events until every row has finished; rows are cancelled when this stops early
        (the consumer stopped, or `await disconnected()` says the client went away)."""
        left, clock = len(rows), asyncio.get_running_loop().time
        next_check = clock() + DISCONNECT_CHECK
        try:
            while left:
                try:
                    event = await asyncio.wait_for(queue.get(), DISCONNECT_CHECK)
                except asyncio.TimeoutError:
                    event = None
                if clock() >= next_check:  # also while tokens flow: a response may be long
                    next_check = clock() + DISCONNECT_CHECK
                    if await disconnected():
                        return
                if event is not None:
                    left -= event.finish is not None
                    yield event
        finally:
            for row in rows:
                row.cancelled = True

    async def attention(self, prompt: str, layer: int, head: int, max_tokens: int = 128) -> dict:
        """Token labels and one head's attention map for the last `max_tokens` tokens of `prompt`."""
        ids = self.encode(prompt)
        n_heads = self.model.cfg.n_heads
        if not 0 <= head < n_heads:
            raise ConfigError(f"head {head} does not exist; the model has heads 0..{n_heads - 1}")

        def run() -> torch.Tensor:
            return attention_maps(self.model, torch.tensor(ids, device=self.engine.batch.device), layer)[head]

        weights = await asyncio.wrap_future(self.engine.call(run))
        ids, weights = ids[-max_tokens:], weights[-max_tokens:, -max_tokens:]
        return {"tokens": token_labels(self.tokenizer, ids), "layer": layer, "head": head,
                "n_layers": self.model.cfg.n_layers, "n_heads": n_heads,
                "weights": [[round(w, 4) for w in row] for row in weights.float().tolist()]}

    def close(self) -> None:
        self.engine.close()
