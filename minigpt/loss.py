"""Cross-entropy over next-token predictions, and perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device | str) -> torch.Tensor:
    """Mean cross-entropy of the model's predictions for one batch of (inputs, targets)."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader: Iterable, model: nn.Module, device: torch.device | str,
                     num_batches: int | None = None) -> float:
    """Average `calc_loss_batch` over the first `num_batches` batches (all by default).

    An empty loader gives NaN, as in the tutorial.
    """
    n_available = len(data_loader)  # type: ignore[arg-type]
    if n_available == 0:
        return float("nan")
    num_batches = n_available if num_batches is None else min(num_batches, n_available)
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total / num_batches


def perplexity(loss: float | torch.Tensor) -> float | torch.Tensor:
    """exp(loss): the effective number of tokens the model hesitates between."""
    return torch.exp(loss) if isinstance(loss, torch.Tensor) else math.exp(loss)
