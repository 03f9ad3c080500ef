"""What the trainer does with a batch: a `Task` turns batches into a loss and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..book import sample_text
from ..device import to_device
from ..plot import plot_losses


class Task(Protocol):
    """The part of training that depends on what is learnt (next tokens, labels, ...)."""

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        """The mean loss of one batch (with gradients when training)."""
        ...

    def evaluate(self, model: nn.Module, batches, device: torch.device) -> dict[str, float]:
        """Metrics over `batches`, called in eval mode without gradients."""
        ...

    def end_of_epoch(self, model: nn.Module, device: torch.device) -> str | None:
        """A line to print and log after each epoch, or None."""
        ...

    def plot(self, history: dict[str, list], out_dir: Path) -> Path | None:
        """Plot the run's evaluation history into `out_dir`; the file written, if any."""
        ...


class LanguageModelTask:
    """Pretraining: next-token prediction on (inputs, targets) windows."""

    def __init__(self, tokenizer, sample_prompt: str, sample_tokens: int = 50) -> None:
        self.tokenizer, self.sample_prompt, self.sample_tokens = tokenizer, sample_prompt, sample_tokens

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        # The model's own loss: `calc_loss_batch`'s value without the (tokens, vocab) logits.
        return model(to_device(batch[0], device), targets=to_device(batch[1], device))

    def evaluate(self, model: nn.Module, batches, device: torch.device) -> dict[str, float]:
        """The mean batch loss."""
        losses = [self.loss(model, batch, device).item() for batch in batches]
        return {"loss": sum(losses) / len(losses) if losses else float("nan")}

    def end_of_epoch(self, model: nn.Module, device: torch.device) -> str:
        """A greedy sample from the fixed prompt."""
        return sample_text(model, self.tokenizer, device, self.sample_prompt, self.sample_tokens)

    def plot(self, history: dict[str, list], out_dir: Path) -> Path:
        return plot_losses(history["epoch"], history["tokens_seen"], history["train_loss"], history["val_loss"],
                           out_dir / "loss-plot.png")
