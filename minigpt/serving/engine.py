"""The decoding engine: one thread owns the model and decodes every row in flight as one batch.

Requests put rows in a queue; between two decoding steps the engine prefills each waiting
row alone and adds it to the running batch (continuous batching), up to `max_batch` rows.
Each step then samples every row's next token with that row's own settings and generator,
so a row gets the tokens it would get alone. A row leaves the batch when it ends or when its
request cancels it (a client that went away).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import tiktoken
import torch

from ..model import GPTModel
from .batch import Batch
from .rows import Event, Row, RowSpec, TokenInfo, token_info

log = logging.getLogger("minigpt.serve")


class Engine:
    """Decodes submitted rows in batches on a background thread; `close` stops it."""

    def __init__(self, model: GPTModel, tokenizer: tiktoken.Encoding, max_batch: int = 8,
                 max_waiting: int = 64) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.batch = Batch(model, max_batch)
        self.waiting: deque[Row] = deque()
        self.jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self.wake = threading.Condition()
        self.closed = False
        self.tokens_generated = 0
        self.peak_batch = 0  # the most rows decoded in one step so far
        self.thread = threading.Thread(target=self._loop, name="minigpt-engine", daemon=True)
        self.thread.start()

    def submit(self, specs: list[RowSpec], emit: Callable[[Event], None]) -> list[Row] | None:
        """Queue one row per spec (indices 0..); `emit` gets their events. None if the queue is full."""
        rows = [Row(spec, i, self.tokenizer, emit, self.batch.device) for i, spec in enumerate(specs)]
        with self.wake:
            if self.closed or len(self.waiting) + len(rows) > self.max_waiting:
                return None
            self.waiting.extend(rows)
            self.wake.notify()
        return rows

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the engine's thread between two steps (the model is used by one thread only)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.wake:
            self.jobs.append((fn, future))
            self.wake.notify()
        return future

    def stats(self) -> dict[str, int]:
        return {"running": len(self.batch.rows), "waiting": len(self.waiting),
                "max_batch": self.max_batch, "tokens_generated": self.tokens_generated,
                "peak_batch": self.peak_batch}

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join()

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not (self.closed or self.waiting or self.jobs or self.batch.rows):
                    self.wake.wait()
                if self.closed:
                    return
                jobs, self.jobs = list(self.jobs), deque()
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as e:  # the caller gets it; the engine goes on
                        future.set_exception(e)
            self._admit()
            if self.batch.rows:
                self._guarded(list(self.batch.rows), self._step, whole_batch=True)

    def _guarded(self, rows: list[Row], work: Callable[[], None], whole_batch: bool = False) -> None:
        """Run `work`; if it fails (a bug, out of memory), end `rows` (and with `whole_batch`, empty
        the batch) with an error, not the server."""
        try:
            work()
        except Exception:
            log.exception("decoding failed; ending %d row(s) with an error", len(rows))
            for row in rows:
                if not row.finished:
                    row.finished = True
                    row.emit(Event(row.index, finish="error"))
            if whole_batch:
                self.batch.leave([])

    def _admit(self) -> None:
        """Prefill waiting rows and add them to the batch, while there is room."""
        while len(self.batch.rows) < self.max_batch:
            with self.wake:
                if not self.waiting:
                    return
                row = self.waiting.popleft()
            if not row.cancelled:
                self._guarded([row], lambda row=row: self._start(row))

    def _start(self, row: Row) -> None:
        spec = row.spec
        cache, logits = self.batch.prefill(spec.prompt, every_position=spec.prompt_logprobs)
        if spec.prompt_logprobs:
            row.emit(Event(row.index, tokens=self._prompt_infos(spec, logits)))
        if spec.max_tokens == 0:
            row.finish("length")
            return
        token = row.choose(logits[-1])
        self.tokens_generated += 1
        if not row.add(token, logits[-1]):
            self.batch.join(row, cache, token)

    @staticmethod
    def _prompt_infos(spec: RowSpec, logits: torch.Tensor) -> list[TokenInfo]:
        """Each prompt token's log-probability given the tokens before it (none for the first)."""
        log_probs = torch.log_softmax(logits.float(), -1)
        return [token_info(log_probs[i - 1], t, spec.logprobs) if i else TokenInfo(t, None)
                for i, t in enumerate(spec.prompt)]

    def _step(self) -> None:
        live = [i for i, row in enumerate(self.batch.rows) if not row.cancelled]
        if len(live) < len(self.batch.rows):
            self.batch.leave(live)
            if not live:
                return
        logits = self.batch.step()
        self.peak_batch = max(self.peak_batch, len(self.batch.rows))
        keep = []
        for i, row in enumerate(self.batch.rows):
            token = row.choose(logits[i])
            self.tokens_generated += 1
            if not row.add(token, logits[i]):
                self.batch.last[i] = token
                keep.append(i)
        if len(keep) < len(self.batch.rows):
            self.batch.leave(keep)
