"""Which windows each rank trains and evaluates on, and where in the data a run is.

The position is kept in `TrainState` as (epoch, windows of it consumed over all ranks), and an
epoch's order is a pure function of (seed, epoch): a resumed run sees the same batches without
replaying the data, and another world size continues from the same place.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..data import stack_examples
from ..distributed import DistInfo
from ..errors import ConfigError
from .config import TrainState


def batch_order(n_windows: int, epoch: int, seed: int) -> torch.Tensor:
    """The shuffled window order of an epoch."""
    return torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class EpochSampler:
    """This rank's part of every global batch (`batch_size` windows per rank) of the training set."""

    def __init__(self, dataset, batch_size: int, grad_accum: int, seed: int, dist_info: DistInfo) -> None:
        self.dataset, self.batch_size, self.seed, self.dist = dataset, batch_size, seed, dist_info
        self.global_batch = batch_size * dist_info.world_size
        self.batches_per_epoch = len(dataset) // self.global_batch
        if self.batches_per_epoch < grad_accum:
            raise ConfigError(
                f"the training split has {len(dataset)} windows: not enough for one step of batch_size "
                f"{batch_size} x grad_accum {grad_accum} x {dist_info.world_size} process(es); "
                "lower them or add data")
        self.steps_per_epoch = self.batches_per_epoch // grad_accum
        self.windows_per_epoch = self.steps_per_epoch * grad_accum * self.global_batch
        self._order_epoch, self._order = -1, []

    def epoch_done(self, state: TrainState) -> bool:
        return state.sample_in_epoch >= self.windows_per_epoch

    def epoch_progress(self, state: TrainState) -> float:
        """Epochs done, fractional (for the history's x axis)."""
        return state.epoch + state.sample_in_epoch / (self.batches_per_epoch * self.global_batch)

    def check_position(self, state: TrainState) -> None:
        """Refuse a resumed position that falls inside one of this run's global batches."""
        if state.sample_in_epoch % self.global_batch:
            raise ConfigError(
                f"the checkpoint stopped {state.sample_in_epoch} windows into epoch {state.epoch + 1}, "
                f"not a multiple of this run's global batch ({self.global_batch}); resume with a batch size and "
                "world size whose product divides it")

    def next_batch(self, state: TrainState) -> tuple[torch.Tensor, ...]:
        """This rank's part of the next global micro-batch; `state`'s data position advances with it."""
        if self.epoch_done(state):
            state.epoch += 1
            state.sample_in_epoch = 0
        if self._order_epoch != state.epoch:  # as Python ints once an epoch, not a tensor read per window
            self._order = batch_order(len(self.dataset), state.epoch, self.seed).tolist()
            self._order_epoch = state.epoch
        start = state.sample_in_epoch + self.dist.rank * self.batch_size
        state.sample_in_epoch += self.global_batch
        return stack_examples(self.dataset, self._order[start:start + self.batch_size])

    def eval_batches(self, dataset, eval_iters: int) -> Iterator[tuple[tuple[torch.Tensor, ...], int]]:
        """This rank's part of each of the first `eval_iters` global batches of `dataset` (in its
        natural order), with the number of windows it holds. A rank whose part of a short last
        batch is empty runs window 0 with weight 0: every rank runs every batch (FSDP needs that)."""
        bs, gb = self.batch_size, self.global_batch
        for i in range(min(eval_iters, math.ceil(len(dataset) / gb))):
            start = i * gb + self.dist.rank * bs
            stop = min(start + bs, (i + 1) * gb, len(dataset))
            yield (stack_examples(dataset, range(start, stop)), stop - start) if stop > start else \
                (stack_examples(dataset, [0]), 0)
