"""An optimizer step without a host synchronisation, and the judging of steps once their numbers are read.

A step's loss and gradient norm stay on the device: a step whose loss or gradients are not finite
is skipped there (the fused AdamW kernel's `found_inf`), and the host reads the steps' numbers
only every `--log-interval` steps (and before an evaluation, a checkpoint or the end), when
`StepGuard` judges each of them in order: the same verdicts, messages and checkpoints as if every
step had been read at once, only reported up to `log_interval - 1` steps later.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.distributed.tensor import DTensor
import torch.distributed as torch_dist
from torch import nn

from ..errors import NonFiniteLoss
from .precision import Precision


class StepGuard:
    """Which weights are known to give a finite loss, and how many bad steps came in a row."""

    def __init__(self, max_bad_steps: int, step: int) -> None:
        self.max_bad_steps, self.in_a_row = max_bad_steps, 0
        self.good_step = step - 1  # the weights of every earlier step gave a finite loss

    def judge(self, loss: float, grads_finite: bool, step: int, echo: Callable[[str], None]) -> bool:
        """Whether step `step`'s update applies: not when its loss or gradients are non-finite;
        `NonFiniteLoss` at the `max_bad_steps`-th such step in a row."""
        if math.isfinite(loss) and grads_finite:
            self.in_a_row, self.good_step = 0, step
            return True
        if math.isfinite(loss):
            self.good_step = step + 1  # the weights stay those that just gave a finite loss
        self.in_a_row += 1
        what = f"loss became {loss}" if not math.isfinite(loss) else "the gradients became non-finite"
        if self.in_a_row >= self.max_bad_steps:
            row = f" ({self.in_a_row} bad steps in a row)" if self.in_a_row > 1 else ""
            raise NonFiniteLoss(f"{what} at step {step}{row}")
        echo(f"step {step}: {what}; update skipped ({self.in_a_row} of --max-bad-steps {self.max_bad_steps})")
        return False


class PendingSteps:
    """The steps taken since the host last read their numbers: (step, loss, gradients bad, lr),
    the loss and flag as device tensors."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []
        self.values: list[torch.Tensor] = []

    def add(self, step: int, lr: float, loss_and_bad: torch.Tensor) -> None:
        self.steps.append((step, lr))
        self.values.append(loss_and_bad)

    def __len__(self) -> int:
        return len(self.steps)

    def read(self) -> list[tuple[int, float, bool, float]]:
        """Each pending step's (step, loss, gradients finite, lr), in one host read; then none pend."""
        if not self.steps:
            return []
        values = torch.stack(self.values).tolist()  # the one synchronisation of the interval
        read = [(step, loss, bad == 0, lr) for (step, lr), (loss, bad) in zip(self.steps, values, strict=True)]
        self.steps, self.values = [], []
        return read


def step_on_device(optimizer: torch.optim.Optimizer, precision: Precision, params: Sequence[nn.Parameter],
                   loss_sum: torch.Tensor, world_size: int, grad_clip: float | None) -> torch.Tensor:
    """Apply the accumulated gradients unless the mean loss over ranks or any rank's gradients are
    non-finite, deciding on the device where it can; returns (mean loss, gradients bad) as a
    float64 tensor for `PendingSteps`."""
    norm = precision.grad_norm(params)
    if isinstance(norm, DTensor):  # FSDP's sharded gradients: the norm is reduced over the ranks here
        norm = norm.full_tensor()
    grads_bad = torch.zeros((), dtype=torch.float64, device=loss_sum.device) if norm is None else \
        (~torch.isfinite(norm)).to(torch.float64)
    numbers = torch.stack([loss_sum, grads_bad])
    if torch_dist.is_initialized():  # one all-reduce: every rank skips the same steps
        torch_dist.all_reduce(numbers)
        numbers = torch.stack([numbers[0] / world_size, numbers[1]])  # the mean loss, the count of bad ranks
    skip = (numbers[1] > 0) | ~torch.isfinite(numbers[0])
    if optimizer.defaults.get("fused") and not precision.scaler.is_enabled():
        # The fused kernel leaves the weights, moments and step count alone when found_inf is 1.
        optimizer.found_inf = skip.to(torch.float32)
        try:
            precision.step(optimizer, params, grad_clip, norm)
        finally:
            del optimizer.found_inf
    elif not bool(skip):  # float16's scaler or an unfused optimizer: decided on the host
        precision.step(optimizer, params, grad_clip, norm)
    optimizer.zero_grad(set_to_none=True)
    return numbers
