"""What `training.Trainer` does with the batches of the `minigpt.heads` models.

    TokenClassificationTask   (ids, labels) batches: per-token cross-entropy; loss and accuracy
    QuestionAnsweringTask     (ids, lengths, start, end) batches: span loss; loss and exact match
    HiddenStatesTask(loss_fn) (ids, ...) batches: any loss of the hidden states a model returns

Each calls the model itself (`model(...)`), never one of its methods, so DDP's hooks run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .device import to_device
from .heads import GPTForQuestionAnswering, GPTForTokenClassification, best_spans, span_loss
from .plot import plot_classification, plot_losses

Batch = tuple[torch.Tensor, ...]


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _plot_losses(history: dict[str, list], out_dir: Path) -> Path:
    return plot_losses(history["epoch"], history["tokens_seen"], history["train_loss"], history["val_loss"],
                       out_dir / "loss-plot.png")


class TokenClassificationTask:
    """Fine-tuning a `GPTForTokenClassification` on (ids, labels) batches, both (batch, tokens),
    -100 marking the tokens not scored; evaluation adds the accuracy over the scored tokens."""

    def loss(self, model: GPTForTokenClassification, batch: Batch, device: torch.device) -> torch.Tensor:
        ids, labels = (to_device(t, device) for t in batch[:2])
        return model(ids, labels=labels)

    def evaluate(self, model: GPTForTokenClassification, batches: Iterable[Batch],
                 device: torch.device) -> dict[str, float]:
        loss_sum, correct, scored = 0.0, 0, 0
        for batch in batches:
            ids, labels = (to_device(t, device) for t in batch[:2])
            logits = model(ids).float()
            loss_sum += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            keep = labels != -100
            correct += int((logits.argmax(-1) == labels)[keep].sum())
            scored += int(keep.sum())
        return {"loss": _ratio(loss_sum, scored), "accuracy": _ratio(correct, scored)}

    def end_of_epoch(self, model: nn.Module, device: torch.device) -> None:
        return None

    def plot(self, history: dict[str, list], out_dir: Path) -> Path:
        return plot_classification(history, out_dir / "accuracy-loss-plot.png")


class QuestionAnsweringTask:
    """Fine-tuning a `GPTForQuestionAnswering` on (ids, lengths, start, end) batches: right-padded
    ids (batch, tokens), each row's real length, and its answer's first and last token (batch,).
    Evaluation adds `exact_match`, the share of rows whose best span (`best_spans`) is the answer."""

    def __init__(self, max_answer_tokens: int = 30) -> None:
        self.max_answer_tokens = max_answer_tokens

    def loss(self, model: GPTForQuestionAnswering, batch: Batch, device: torch.device) -> torch.Tensor:
        ids, lengths, start, end = (to_device(t, device) for t in batch[:4])
        return model(ids, start_positions=start, end_positions=end, lengths=lengths)

    def evaluate(self, model: GPTForQuestionAnswering, batches: Iterable[Batch],
                 device: torch.device) -> dict[str, float]:
        losses, exact, rows = [], 0, 0
        for batch in batches:
            ids, lengths, start, end = (to_device(t, device) for t in batch[:4])
            start_logits, end_logits = model(ids, lengths=lengths)
            losses.append(span_loss(start_logits.float(), end_logits.float(), start, end).item())
            found_start, found_end = best_spans(start_logits, end_logits, self.max_answer_tokens)
            exact += int(((found_start == start) & (found_end == end)).sum())
            rows += len(ids)
        return {"loss": _ratio(sum(losses), len(losses)), "exact_match": _ratio(exact, rows)}

    def end_of_epoch(self, model: nn.Module, device: torch.device) -> None:
        return None

    def plot(self, history: dict[str, list], out_dir: Path) -> Path:
        return _plot_losses(history, out_dir)


class HiddenStatesTask:
    """Training on any loss of the hidden states: `loss_fn(model(ids), batch)`, the batch's
    tensors on the device and `ids = batch[0]`; e.g. a `GPTBaseModel` under a loss of its own."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor]) -> None:
        self.loss_fn = loss_fn

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        batch = tuple(to_device(t, device) for t in batch)
        return self.loss_fn(model(batch[0]), batch)

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], device: torch.device) -> dict[str, float]:
        losses = [self.loss(model, batch, device).item() for batch in batches]
        return {"loss": _ratio(sum(losses), len(losses))}

    def end_of_epoch(self, model: nn.Module, device: torch.device) -> None:
        return None

    def plot(self, history: dict[str, list], out_dir: Path) -> Path:
        return _plot_losses(history, out_dir)
