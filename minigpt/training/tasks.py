"""What the trainer does with a batch: a `Task` turns batches into a loss and metrics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..book import sample_text
from ..device import to_device
from ..evaluation.scoring import token_byte_lengths
from ..loss import IGNORE_INDEX
from ..plot import plot_losses
from ..tokenizer import EOS_TOKEN


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


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
        self._byte_lengths: torch.Tensor | None = None

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        # The model's own loss: `calc_loss_batch`'s value without the (tokens, vocab) logits.
        return model(to_device(batch[0], device), targets=to_device(batch[1], device))

    def evaluate(self, model: nn.Module, batches, device: torch.device) -> dict[str, float]:
        """The mean batch loss, and bits per byte (`bpb`): each batch's loss in bits over the UTF-8
        bytes its targets stand for, comparable across tokenizers (end-of-text counts no bytes)."""
        losses, bpbs = [], []
        for batch in batches:
            loss = self.loss(model, batch, device).item()
            n_bytes = int(self.byte_lengths()[batch[1].long().cpu()].sum())
            losses.append(loss)
            scored = int((batch[1] != IGNORE_INDEX).sum())  # padding (-100) is neither loss nor bytes
            bpbs.append(loss * scored / math.log(2) / n_bytes if n_bytes else float("nan"))
        return {"loss": _mean(losses), "bpb": _mean(bpbs)}

    def byte_lengths(self) -> torch.Tensor:
        """The UTF-8 bytes of every token id the token cache can hold (uint16), computed once."""
        if self._byte_lengths is None:
            self._byte_lengths = token_byte_lengths(self.tokenizer, max(self.tokenizer.n_vocab, 1 << 16))
        return self._byte_lengths

    def end_of_epoch(self, model: nn.Module, device: torch.device) -> str | None:
        """A greedy sample from the fixed prompt; an empty prompt starts from `<|endoftext|>`, as
        Hugging Face's `generate()` without inputs does. None when `sample_tokens` is 0."""
        if self.sample_tokens == 0:
            return None
        return sample_text(model, self.tokenizer, device, self.sample_prompt or EOS_TOKEN, self.sample_tokens)

    def plot(self, history: dict[str, list], out_dir: Path) -> Path:
        train = history["train_loss"]
        # Without validation the curve is the training loss alone (NaNs draw nothing).
        val = history.get("val_loss") or [math.nan] * len(train)
        return plot_losses(history["epoch"], history["tokens_seen"], train, val, out_dir / "loss-plot.png")
