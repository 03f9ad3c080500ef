"""Fine-tuning GPT for text classification: the tutorial's chapter 6, padding-aware.

The path of a fine-tuning run, step by step:

    read_examples("train.csv")           (texts, labels) from a .csv or .jsonl with text + label columns
    sort_labels(labels)                  the label set: class i is labels[i]
    encode_texts(token_lists, 120)       right-padded ids (n, 120) and each text's real length
    GPTClassifier.from_gpt(gpt, labels)  GPT-2's body with a num_classes head on the last real token
    freeze(model, trainable_blocks=1)    train only the last block(s), the final norm and the head
    ClassificationTask                   cross-entropy and accuracy, for `training.Trainer`'s loop
    evaluate_dataset(model, test_set)    loss, accuracy and per-class precision / recall

`python -m minigpt.classify train|evaluate|predict` (`minigpt.cli.classify`) runs it from the command line.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .config import GPTConfig, as_config
from .data import stack_examples
from .documents import find_column, iter_jsonl_records
from .device import to_device
from .errors import ConfigError, DataError
from .heads import GPTHeadModel
from .plot import plot_classification
from .tokenizer import EOS_ID, EOS_TOKEN

# ----------------------------------------------------------------------------------------------
# Data: labelled texts from a .csv or .jsonl file


def _csv_rows(path: Path, text_column: str | None, label_column: str | None) -> Iterator[tuple[int, str, Any]]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: drop a byte-order mark
        reader = csv.DictReader(f, strict=True)  # an unclosed quote is an error, not a swallowed line
        if not reader.fieldnames:
            raise DataError(f"{path}: no header row (expected column names such as text,label)")
        text = find_column(path, reader.fieldnames, text_column, "text", "--text-column")
        label = find_column(path, reader.fieldnames, label_column, "label", "--label-column")
        for row in reader:
            if row[text] is None or row[label] is None:  # DictReader's filler for missing fields
                raise DataError(f"{path}: line {reader.line_num} has fewer fields than the header's "
                                f"{len(reader.fieldnames)}")
            yield reader.line_num, row[text], row[label].strip()


def _jsonl_rows(path: Path, text_field: str | None, label_field: str | None) -> Iterator[tuple[int, str, Any]]:
    for lineno, record in iter_jsonl_records(path):
        text = find_column(path, list(record), text_field, "text", "--text-column")
        label = find_column(path, list(record), label_field, "label", "--label-column")
        if not isinstance(record[text], str):
            raise DataError(f"{path}: line {lineno}: {text!r} is a {type(record[text]).__name__}, not a string")
        yield lineno, record[text], record[label]


def read_examples(path: str | Path, text_column: str | None = None, label_column: str | None = None,
                  labels: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(texts, labels) of a labelled data file.

    A `.csv` needs a header row, a `.jsonl` one object per line; the text and label columns
    default to the ones named "text" and "label" in any case (the tutorial's `Text,Label`).
    Labels may be strings or integers and are returned as strings ("spam", "1"). With `labels`
    (a trained classifier's), any other label is an error naming its line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    readers = {".csv": _csv_rows, ".jsonl": _jsonl_rows}
    if path.suffix.lower() not in readers:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use a .csv or a .jsonl file")
    texts, found = [], []
    try:
        for line, text, label in readers[path.suffix.lower()](path, text_column, label_column):
            # bool is an int subclass, and True/False are rarely meant as class numbers.
            if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label) == "":
                raise DataError(f"{path}: line {line}: the label must be a non-empty string or an integer, "
                                f"got {label!r}")
            label = str(label)
            if labels is not None and label not in labels:
                raise DataError(f"{path}: line {line}: unknown label {label!r}; the classifier's labels are: "
                                f"{', '.join(labels)}")
            if not text.strip():
                raise DataError(f"{path}: line {line}: the text is empty")
            texts.append(text)
            found.append(label)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); convert the file to UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: {e}") from None
    if not texts:
        raise DataError(f"{path}: no examples")
    return texts, found


def sort_labels(labels: Iterable[str]) -> list[str]:
    """The distinct labels in class order: numeric if all are integers (so 0, 1, 2 stay classes
    0, 1, 2), else alphabetical. A classifier needs at least two."""
    distinct = set(labels)
    if len(distinct) < 2:
        raise DataError(f"the data has a single label {sorted(distinct)}: a classifier needs at least two")
    if all(re.fullmatch(r"[+-]?\d+", s) for s in distinct):
        return sorted(distinct, key=lambda s: (int(s), s))
    return sorted(distinct)


def encode_texts(token_lists: Sequence[Sequence[int]], max_length: int,
                 pad_id: int = EOS_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids truncated to `max_length` and right-padded with `pad_id`: (ids (n, max_length),
    lengths (n,)). Only `lengths` tells the model where each text ends; `pad_id` is irrelevant."""
    ids = torch.full((len(token_lists), max_length), pad_id, dtype=torch.long)
    lengths = torch.zeros(len(token_lists), dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        tokens = tokens[:max_length]
        ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        lengths[i] = len(tokens)
    return ids, lengths


def tokenize(texts: Sequence[str], tokenizer: tiktoken.Encoding) -> list[list[int]]:
    """Each text's GPT-2 token ids (`<|endoftext|>` allowed in the text)."""
    return tokenizer.encode_batch(list(texts), allowed_special={EOS_TOKEN})


def make_dataset(token_lists: Sequence[Sequence[int]], labels: Sequence[str], label_set: Sequence[str],
                 max_length: int) -> TensorDataset:
    """Examples (ids, length, class index), as `training.Trainer` stacks them into batches."""
    ids, lengths = encode_texts(token_lists, max_length)
    index = {label: i for i, label in enumerate(label_set)}
    return TensorDataset(ids, lengths, torch.tensor([index[label] for label in labels], dtype=torch.long))


def split_indices(n: int, val_ratio: float, test_ratio: float, seed: int) -> tuple[list[int], list[int], list[int]]:
    """A seeded shuffle cut into (train, validation, test), as the tutorial's random_split."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val, n_test = round(n * val_ratio), round(n * test_ratio)
    n_train = n - n_val - n_test
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def balance(targets: torch.Tensor, labels: Sequence[str]) -> str:
    """Examples per class, e.g. "100 examples (ham 50 = 50.0%, spam 50 = 50.0%)"."""
    counts = torch.bincount(targets, minlength=len(labels)).tolist()
    n = len(targets)
    parts = ", ".join(f"{label} {c} = {100 * c / max(n, 1):.1f}%" for label, c in zip(labels, counts, strict=True))
    return f"{n} examples ({parts})"


# ----------------------------------------------------------------------------------------------
# The model


class GPTClassifier(GPTHeadModel):
    """GPT-2's body and a head that maps a text's last real token to one logit per class.

    A `GPTHeadModel` (composed, not derived from `GPTModel`) whose head has one output per class
    (the tutorial's chapter 6). The causal mask lets only the last token see the whole text, so
    it is the one to classify from. The tutorial reads the last *position*, which is a padding
    token in every text shorter than the batch; here `lengths` picks each row's last real token,
    and with right padding and causal attention nothing a text's tokens compute depends on the
    padding after them. `labels` name the classes; `max_length` is the truncation length the
    classifier was trained with. `optimize_for_cpu(classifier.gpt)` applies the CPU backend.
    """

    head_config = None  # a classifier checkpoint is rebuilt from the labels in its train_args

    def __init__(self, cfg: GPTConfig | dict[str, Any] | str, labels: Sequence[str],
                 max_length: int | None = None) -> None:
        cfg = as_config(cfg)
        max_length = max_length or cfg.context_length
        if not 0 < max_length <= cfg.context_length:
            raise ConfigError(f"max_length must be in [1, {cfg.context_length}] (the context length), "
                              f"got {max_length}")
        super().__init__(cfg, nn.Linear(cfg.emb_dim, len(labels)))
        self.labels, self.max_length = list(labels), max_length

    def forward(self, in_idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (batch, num_classes) for right-padded ids (batch, tokens) whose real
        lengths are `lengths` (batch,); without `lengths`, every row is a whole text."""
        logits = self.gpt(in_idx)  # (batch, tokens, num_classes): the head is small
        if lengths is None:
            return logits[:, -1]
        if int(lengths.min()) < 1 or int(lengths.max()) > in_idx.shape[1]:
            raise ConfigError(f"lengths must be in [1, {in_idx.shape[1]}], got {lengths.tolist()}")
        return logits[torch.arange(len(in_idx), device=logits.device), lengths.to(logits.device) - 1]

    def num_parameters(self, exclude_output_head: bool = False, exclude_position: bool = False) -> int:
        """Distinct parameters of the GPT's body and the class head; see `GPTModel.num_parameters`."""
        return self.gpt.num_parameters(exclude_output_head, exclude_position)

# ----------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def confusion(model: GPTClassifier, batches: Iterable[tuple[torch.Tensor, ...]],
              device: torch.device) -> tuple[torch.Tensor, float]:
    """(true class x predicted class) counts over `batches`, and the summed cross-entropy."""
    k = len(model.labels)
    counts = torch.zeros(k, k, dtype=torch.long)
    loss_sum = 0.0
    for ids, lengths, targets in batches:
        logits = model(ids.to(device), lengths.to(device)).float()
        loss_sum += F.cross_entropy(logits, targets.to(device), reduction="sum").item()
        counts += torch.bincount(targets * k + logits.argmax(-1).cpu(), minlength=k * k).view(k, k)
    return counts, loss_sum


def scores(counts: torch.Tensor, loss_sum: float, labels: Sequence[str]) -> dict[str, Any]:
    """Loss, accuracy and, per class, support, precision and recall (0 where undefined)."""
    n = int(counts.sum())
    correct = counts.diag()
    predicted, actual = counts.sum(0), counts.sum(1)
    return {
        "examples": n,
        "loss": loss_sum / n if n else float("nan"),
        "accuracy": int(correct.sum()) / n if n else float("nan"),
        "classes": {label: {"support": int(actual[i]),
                            "precision": int(correct[i]) / int(predicted[i]) if predicted[i] else 0.0,
                            "recall": int(correct[i]) / int(actual[i]) if actual[i] else 0.0}
                    for i, label in enumerate(labels)},
    }


def batches_of(dataset: TensorDataset, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    for start in range(0, len(dataset), batch_size):
        yield stack_examples(dataset, range(start, min(start + batch_size, len(dataset))))


def evaluate_dataset(model: GPTClassifier, dataset: TensorDataset, batch_size: int = 32,
                     device: torch.device | str | None = None) -> dict[str, Any]:
    """`scores` over a whole dataset, in eval mode."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts, loss_sum = confusion(model, batches_of(dataset, batch_size), device)
    model.train(was_training)
    return scores(counts, loss_sum, model.labels)


def format_scores(split: str, result: dict[str, Any]) -> str:
    lines = [f"{split}: {result['examples']} examples, loss {result['loss']:.3f}, "
             f"accuracy {100 * result['accuracy']:.2f}%",
             f"  {'label':<12} {'support':>8} {'precision':>10} {'recall':>8}"]
    for label, c in result["classes"].items():
        lines.append(f"  {label:<12} {c['support']:>8} {100 * c['precision']:>9.1f}% {100 * c['recall']:>7.1f}%")
    return "\n".join(lines)


class ClassificationTask:
    """What `training.Trainer` does with a batch of (ids, lengths, class indices) when fine-tuning
    a `GPTClassifier`: cross-entropy on the label; accuracy besides the loss when evaluating."""

    def loss(self, model: GPTClassifier, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        ids, lengths, targets = (to_device(t, device) for t in batch)
        return F.cross_entropy(model(ids, lengths), targets)

    def evaluate(self, model: GPTClassifier, batches: Iterable[tuple[torch.Tensor, ...]],
                 device: torch.device) -> dict[str, float]:
        result = scores(*confusion(model, batches, device), model.labels)
        return {"loss": result["loss"], "accuracy": result["accuracy"]}

    def end_of_epoch(self, model: GPTClassifier, device: torch.device) -> None:
        return None  # the evaluations already print everything there is to see

    def plot(self, history: dict[str, list], out_dir: Path) -> Path:
        return plot_classification(history, out_dir / "accuracy-loss-plot.png")


@torch.no_grad()
def predict(model: GPTClassifier, texts: Sequence[str], tokenizer: tiktoken.Encoding,
            batch_size: int = 32) -> list[tuple[str, float]]:
    """(label, probability) of each text; texts longer than `model.max_length` tokens are truncated."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize(texts[start:start + batch_size], tokenizer)
        if not all(tokens):
            raise DataError("cannot classify an empty text")
        ids, lengths = encode_texts(tokens, min(model.max_length, max(map(len, tokens))))
        model.check_token_ids(ids)
        probs = torch.softmax(model(ids.to(device), lengths.to(device)).float(), dim=-1)
        p, index = probs.max(-1)
        out += [(model.labels[i], q) for i, q in zip(index.tolist(), p.tolist(), strict=True)]
    model.train(was_training)
    return out


