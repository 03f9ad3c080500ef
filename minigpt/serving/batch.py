"""The rows being decoded together, on one KV cache: rows join it with their prompt prefilled
alone, each step feeds every row its newest token, finished rows leave.

The rows are right-aligned in the cache (left padding, which the model masks out and which
does not shift a row's positions), so prompts of any lengths share one cache whose every row
is written at the same slot each step. A longer newcomer shifts the others right; rows that
leave let the rest shift back left. Keys and values do not depend on the slot they sit in,
only on the row's own positions, so moving them changes no number.
"""

from __future__ import annotations

import contextlib

import torch

from ..model import GPTModel, KVCache
from .rows import Row


class Batch:
    """The rows in the batch, their cache, their left padding and the token each feeds next."""

    def __init__(self, model: GPTModel, max_batch: int) -> None:
        self.model, self.max_batch = model, max_batch
        self.device, self.dtype = model.tok_emb.weight.device, model.tok_emb.weight.dtype
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.pad = torch.zeros(0, dtype=torch.long, device=self.device)
        self.last: list[int] = []
        self._decoding: dict[int, contextlib.AbstractContextManager[None]] = {}

    def decoding(self, batch_size: int) -> contextlib.AbstractContextManager[None]:
        """`model.decoding` for one row, or for `max_batch` rows serving every batch of two or more.

        Set up once each: the batch size changes at almost every join and leave, and packing
        the weights anew each time would cost more than the steps between the changes.
        """
        size = 1 if batch_size == 1 else self.max_batch
        if size not in self._decoding:
            self._decoding[size] = self.model.decoding(size)
        return self._decoding[size]

    @torch.no_grad()
    def prefill(self, prompt: list[int], every_position: bool = False) -> tuple[KVCache, torch.Tensor]:
        """Run one prompt alone: its cache and its logits, (tokens, vocab) or just the last (1, vocab)."""
        cache = KVCache(self.model.cfg, 1, len(prompt), device=self.device, dtype=self.dtype)
        with self.decoding(1):
            logits = self.model(torch.tensor([prompt], device=self.device), cache, last_only=not every_position)
        return cache, logits[0]

    def join(self, row: Row, cache: KVCache, first_token: int) -> None:
        """Add a row whose prompt is in `cache` (from `prefill`) and whose next input is `first_token`."""
        width = 0 if self.cache is None else self.cache.length
        length = cache.length
        shift = max(0, length - width)
        self._relayout(list(range(len(self.rows))), shift, extra=cache)
        self.rows.append(row)
        self.last.append(first_token)

    def leave(self, keep: list[int]) -> None:
        """Keep only the rows at indices `keep`; drop the padding columns no row needs any more."""
        if not keep:
            self.rows, self.last, self.cache = [], [], None
            self.pad = self.pad[:0]
            return
        shift = -int(self.pad[keep].min())
        self.rows = [self.rows[i] for i in keep]
        self.last = [self.last[i] for i in keep]
        self._relayout(keep, shift)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Feed every row its newest token: the next logits of each row, (rows, vocab)."""
        cache = self.cache
        if cache.length == cache.max_len:
            self._relayout(list(range(len(self.rows))), 0)  # grows the capacity
            cache = self.cache
        tokens = torch.tensor(self.last, device=self.device)[:, None]
        pad = self.pad if bool(self.pad.any()) else None  # None: plain attention over every key
        with self.decoding(len(self.rows)):
            return self.model(tokens, cache, pad, last_only=True)[:, -1]

    def _relayout(self, keep: list[int], shift: int, extra: KVCache | None = None) -> None:
        """A new cache: rows `keep` of the old one moved `shift` slots (right if > 0), then `extra`'s row."""
        cfg = self.model.cfg
        old_len = 0 if self.cache is None else self.cache.length
        length = old_len + shift if extra is None else max(old_len + shift, extra.length)
        capacity = min(cfg.context_length, max(2 * length, length + 16))
        cache = KVCache(cfg, len(keep) + (extra is not None), capacity, device=self.device, dtype=self.dtype)
        pad = self.pad[keep] + shift
        if keep:
            index = torch.tensor(keep, device=self.device)
            src = slice(max(0, -shift), old_len)
            dst = slice(max(0, shift), old_len + shift)
            cache.keys[:, :len(keep), :, dst] = self.cache.keys[:, index, :, src]
            cache.values[:, :len(keep), :, dst] = self.cache.values[:, index, :, src]
        if extra is not None:
            start = length - extra.length
            cache.keys[:, -1:, :, start:length] = extra.keys[:, :, :, :extra.length]
            cache.values[:, -1:, :, start:length] = extra.values[:, :, :, :extra.length]
            pad = torch.cat([pad, torch.tensor([start], device=self.device)])
        cache.length = length
        self.cache, self.pad = cache, pad
