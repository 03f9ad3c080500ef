"""Fine-tuning GPT for text classification: the tutorial's chapter 6, padding-aware.

The path of a fine-tuning run, step by step:

    read_examples("train.csv")           (texts, labels) from a .csv or .jsonl with text + label columns
    sort_labels(labels)                  the label set: class i is labels[i]
    encode_texts(token_lists, 120)       right-padded ids (n, 120) and each text's real length
    GPTClassifier.from_gpt(gpt, labels)  GPT-2's body with a num_classes head on the last real token
    freeze(model, trainable_blocks=1)    train only the last block(s), the final norm and the head
    ClassificationTask                   cross-entropy and accuracy, for `train.Trainer`'s loop
    evaluate_dataset(model, test_set)    loss, accuracy and per-class precision / recall

`python -m minigpt.classify train|evaluate|predict` runs it from the command line.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from .checkpoint import WEIGHTS_FILE, CheckpointError, load_state_into, load_trainer_state, read_config
from .config import GPTConfig, as_config, get_preset
from .data import DataError, iter_jsonl_records
from .device import DTYPES, keep_freed_memory, resolve_device, to_device
from .model import GPTModel
from .plot import plot_classification
from .tokenizer import EOS_ID, EOS_TOKEN, get_tokenizer
from .train import NonFiniteLoss, Trainer, TrainConfig, list_checkpoints, resolve_resume, stack_examples

# ----------------------------------------------------------------------------------------------
# Data: labelled texts from a .csv or .jsonl file


def _column(path: Path, names: Sequence[str], given: str | None, default: str, flag: str) -> str:
    """The column (or JSON field) to read: `given`, else the one named `default` in any case."""
    if given is not None:
        if given not in names:
            raise DataError(f"{path}: no column {given!r}; its columns are: {', '.join(names)}")
        return given
    matches = [name for name in names if name.strip().lower() == default]
    if len(matches) != 1:
        raise DataError(f"{path}: no column named {default!r}; its columns are: {', '.join(names)} "
                        f"(choose one with {flag})")
    return matches[0]


def _csv_rows(path: Path, text_column: str | None, label_column: str | None) -> Iterator[tuple[int, str, Any]]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: drop a byte-order mark
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: no header row (expected column names such as text,label)")
        text = _column(path, reader.fieldnames, text_column, "text", "--text-column")
        label = _column(path, reader.fieldnames, label_column, "label", "--label-column")
        for row in reader:
            if row[text] is None or row[label] is None:  # DictReader's filler for missing fields
                raise DataError(f"{path}: line {reader.line_num} has fewer fields than the header's "
                                f"{len(reader.fieldnames)}")
            yield reader.line_num, row[text], row[label].strip()


def _jsonl_rows(path: Path, text_field: str | None, label_field: str | None) -> Iterator[tuple[int, str, Any]]:
    for lineno, record in iter_jsonl_records(path):
        text = _column(path, list(record), text_field, "text", "--text-column")
        label = _column(path, list(record), label_field, "label", "--label-column")
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


def tokenize(texts: Sequence[str], tokenizer) -> list[list[int]]:
    return tokenizer.encode_batch(list(texts), allowed_special={EOS_TOKEN})


def make_dataset(token_lists: Sequence[Sequence[int]], labels: Sequence[str], label_set: Sequence[str],
                 max_length: int) -> TensorDataset:
    """Examples (ids, length, class index), as `train.Trainer` stacks them into batches."""
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


class GPTClassifier(GPTModel):
    """A `GPTModel` whose output head maps a text's last real token to one logit per class.

    The causal mask lets only the last token see the whole text, so it is the one to classify
    from (the tutorial's chapter 6). The tutorial reads the last *position*, which is a padding
    token in every text shorter than the batch; here `lengths` picks each row's last real token,
    and with right padding and causal attention nothing a text's tokens compute depends on the
    padding after them. `labels` name the classes; `max_length` is the truncation length the
    classifier was trained with.
    """

    def __init__(self, cfg: GPTConfig | dict[str, Any] | str, labels: Sequence[str],
                 max_length: int | None = None) -> None:
        cfg = as_config(cfg)
        # The new head has its own weights, so there is nothing to tie, and a checkpoint must store it.
        # (GPTModel builds its vocabulary head first; it is dropped right away.)
        super().__init__(cfg.replace(tie_weights=False))
        self.labels = list(labels)
        self.max_length = max_length or cfg.context_length
        if not 0 < self.max_length <= cfg.context_length:
            raise ValueError(f"max_length must be in [1, {cfg.context_length}] (the context length), "
                             f"got {self.max_length}")
        self.out_head = nn.Linear(cfg.emb_dim, len(self.labels))
        if cfg.init == "gpt2":
            self._init_gpt2(self.out_head)

    @classmethod
    def from_gpt(cls, gpt: GPTModel, labels: Sequence[str], max_length: int | None = None) -> GPTClassifier:
        """A classifier with `gpt`'s embeddings, blocks and final norm (copied) and a new head."""
        model = cls(gpt.cfg, labels, max_length)
        body = {k: v for k, v in gpt.state_dict().items() if not k.startswith("out_head.")}
        missing, unexpected = model.load_state_dict(body, strict=False)
        assert not unexpected and all(k.startswith("out_head.") for k in missing), (missing, unexpected)
        return model

    def forward(self, in_idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Class logits (batch, num_classes) for right-padded ids (batch, tokens) whose real
        lengths are `lengths` (batch,); without `lengths`, every row is a whole text."""
        logits = super().forward(in_idx)  # (batch, tokens, num_classes): the head is small
        if lengths is None:
            return logits[:, -1]
        if int(lengths.min()) < 1 or int(lengths.max()) > in_idx.shape[1]:
            raise ValueError(f"lengths must be in [1, {in_idx.shape[1]}], got {lengths.tolist()}")
        return logits[torch.arange(len(in_idx), device=logits.device), lengths.to(logits.device) - 1]


def freeze(model: GPTClassifier, trainable_blocks: int | None) -> int:
    """Train only the last `trainable_blocks` transformer blocks, the final norm and the head
    (None: the whole model); returns the number of trainable parameters.

    The tutorial's choice (1 block) keeps most of what pretraining learned fixed, trains fast,
    and is about as accurate as training everything on small data sets.
    """
    n_layers = len(model.trf_blocks)
    if trainable_blocks is not None and not 0 <= trainable_blocks <= n_layers:
        raise ValueError(f"--trainable-blocks must be in [0, {n_layers}] or 'all', got {trainable_blocks}")
    model.requires_grad_(trainable_blocks is None)
    if trainable_blocks is not None:
        for module in (*model.trf_blocks[n_layers - trainable_blocks:], model.final_norm, model.out_head):
            module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> GPTClassifier:
    """A classifier checkpoint written by `python -m minigpt.classify train`, in eval mode."""
    path = Path(path)
    cfg, meta = read_config(path)
    info = meta.get("train_args") or {}
    if "labels" not in info:
        raise CheckpointError(f"{path}: not a classifier checkpoint (its config.json records no labels); "
                              "make one with python -m minigpt.classify train")
    model = GPTClassifier(cfg, info["labels"], info["max_length"])
    weights = path / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: missing, corrupt or truncated ({e})") from e
    load_state_into(model, state, str(weights))
    return model.to(device).eval()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's newest checkpoint."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and list_checkpoints(path):
        return list_checkpoints(path)[-1]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    return path


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
    """What `train.Trainer` does with a batch of (ids, lengths, class indices) when fine-tuning
    a `GPTClassifier`: cross-entropy on the label; accuracy besides the loss when evaluating."""

    def loss(self, model: GPTClassifier, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        ids, lengths, targets = (to_device(t, device) for t in batch)
        return F.cross_entropy(model(ids, lengths), targets)

    def evaluate(self, model: GPTClassifier, batches, device: torch.device) -> dict[str, float]:
        result = scores(*confusion(model, batches, device), model.labels)
        return {"loss": result["loss"], "accuracy": result["accuracy"]}

    def end_of_epoch(self, model: GPTClassifier, device: torch.device) -> None:
        return None  # the evaluations already print everything there is to see

    def plot(self, history: dict[str, list], out_dir: Path) -> Path:
        return plot_classification(history, out_dir / "accuracy-loss-plot.png")


@torch.no_grad()
def predict(model: GPTClassifier, texts: Sequence[str], tokenizer, batch_size: int = 32) -> list[tuple[str, float]]:
    """(label, probability) of each text; texts longer than `model.max_length` tokens are truncated."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize(texts[start:start + batch_size], tokenizer)
        if not all(tokens):
            raise ValueError("cannot classify an empty text")
        ids, lengths = encode_texts(tokens, min(model.max_length, max(map(len, tokens))))
        probs = torch.softmax(model(ids.to(device), lengths.to(device)).float(), dim=-1)
        p, index = probs.max(-1)
        out += [(model.labels[i], q) for i, q in zip(index.tolist(), p.tolist(), strict=True)]
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------
# Command line

# Flags that shape the model: a resumed run must keep them.
MODEL_ARGS = ("init_from", "preset", "drop_rate", "trainable_blocks", "max_length")


def _blocks(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of blocks or 'all', got {value!r}") from None


def build_parser(train_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The CLI; `train_defaults` (a checkpoint's arguments) become the train command's defaults."""
    p = argparse.ArgumentParser(prog="python -m minigpt.classify",
                                description="Fine-tune a GPT as a text classifier, evaluate it, predict with it.")
    sub = p.add_subparsers(dest="command", required=True)
    formatter = argparse.ArgumentDefaultsHelpFormatter
    columns = argparse.ArgumentParser(add_help=False)
    columns.add_argument("--text-column", default=None, help="text column / field (default: 'text', any case)")
    columns.add_argument("--label-column", default=None, help="label column / field (default: 'label', any case)")
    running = argparse.ArgumentParser(add_help=False)
    running.add_argument("--batch-size", type=int, default=8, help="texts per batch")
    running.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")

    t = sub.add_parser("train", parents=[columns, running], formatter_class=formatter,
                       help="fine-tune on a labelled .csv / .jsonl file",
                       description="Fine-tune a GPT as a classifier. The defaults are the tutorial's chapter 6: "
                                   "GPT-2 124M, last block + final norm + head trained, AdamW lr 5e-5, 5 epochs.")
    g = t.add_argument_group("data")
    g.add_argument("--data", default=None, help="labelled .csv (with a header) or .jsonl file")
    g.add_argument("--val-data", default=None, help="a separate validation file (default: split from --data)")
    g.add_argument("--test-data", default=None, help="a separate test file (default: split from --data)")
    g.add_argument("--val-ratio", type=float, default=0.1, help="fraction of --data held out for validation")
    g.add_argument("--test-ratio", type=float, default=0.2, help="fraction of --data held out for testing")
    g.add_argument("--max-length", type=int, default=None,
                   help="pad / truncate texts to this many tokens (default: the longest training text)")
    g = t.add_argument_group("model")
    g.add_argument("--init-from", default="gpt2",
                   help="pretrained weights: gpt2, gpt2-medium, ..., or a checkpoint directory of ours "
                        "(e.g. runs/the-verdict/checkpoints/step-000100), Hugging Face's or OpenAI's")
    g.add_argument("--preset", default=None, help="instead, start from random weights of this shape (e.g. tiny)")
    g.add_argument("--drop-rate", type=float, default=None, help="override the model's dropout")
    g.add_argument("--trainable-blocks", type=_blocks, default=1,
                   help="train the last N transformer blocks (plus final norm and head); 'all': everything")
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps instead")
    g.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="cosine floor (default: lr, no decay)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=None)
    g.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    g.add_argument("--seed", type=int, default=123, help="seeds the head, the split, dropout and batch order")
    g = t.add_argument_group("evaluation and output")
    g.add_argument("--eval-interval", type=int, default=50, help="evaluate every N steps (0: at the end only)")
    g.add_argument("--eval-iters", type=int, default=5, help="batches per split in those evaluations")
    g.add_argument("--out-dir", default=None, help="run directory (default: runs/<data name>-classifier)")
    g.add_argument("--save-interval", type=int, default=None, help="checkpoint every N steps (always at the end)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
    g.add_argument("--resume", default=None, help="a checkpoint directory, or 'latest' in --out-dir")
    g.add_argument("--report-to", choices=("none", "tensorboard", "wandb"), default="none")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    if train_defaults:
        t.set_defaults(**train_defaults)

    e = sub.add_parser("evaluate", parents=[columns, running], formatter_class=formatter,
                       help="accuracy and per-class precision / recall on a labelled file")
    e.add_argument("--checkpoint", required=True, help="a classifier checkpoint, or its run directory")
    e.add_argument("--data", required=True, help="labelled .csv or .jsonl file")

    r = sub.add_parser("predict", parents=[running], formatter_class=formatter,
                       help="print label and probability for each text")
    r.add_argument("--checkpoint", required=True, help="a classifier checkpoint, or its run directory")
    r.add_argument("texts", nargs="*", help="texts to classify (default: each line of --input)")
    r.add_argument("--input", default="-", help="file with one text per line; '-' reads stdin")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse flags; `train --resume` takes its defaults from the checkpoint."""
    args = build_parser().parse_args(argv)
    if args.command != "train" or args.resume is None:
        return args
    out_dir = Path(args.out_dir or default_out_dir(args.data or ""))
    ckpt = resolve_resume(args.resume, out_dir)
    _, meta = read_config(ckpt)
    saved = meta.get("train_args") or {}
    if "labels" not in saved:
        raise CheckpointError(f"{ckpt}: not a classifier training checkpoint (no labels in its config.json)")
    args = build_parser(saved).parse_args(argv)
    args.resume = str(ckpt)
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint: {saved.get(k)})"
               for k in MODEL_ARGS if getattr(args, k) != saved.get(k)]
    if changed:
        raise ValueError(f"cannot resume {ckpt} with a different model: {', '.join(changed)}")
    return args


def default_out_dir(data: str) -> Path:
    return Path("runs") / f"{Path(data).stem}-classifier"


def check_args(args: argparse.Namespace) -> None:
    if not args.data:
        raise ValueError("train needs --data: a labelled .csv or .jsonl file")
    for name in ("epochs", "batch_size", "grad_accum", "eval_iters", "keep_last", "max_steps", "save_interval",
                 "max_length"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.eval_interval < 0 or args.warmup_steps < 0 or args.weight_decay < 0:
        raise ValueError("--eval-interval, --warmup-steps and --weight-decay must not be negative")
    val_ratio = 0.0 if args.val_data else args.val_ratio
    test_ratio = 0.0 if args.test_data else args.test_ratio
    if not (0 <= val_ratio < 1 and 0 <= test_ratio < 1 and val_ratio + test_ratio < 1):
        raise ValueError(f"--val-ratio ({args.val_ratio}) and --test-ratio ({args.test_ratio}) must be in [0, 1) "
                         "and leave some training data")
    if not args.val_data and not val_ratio:
        raise ValueError("validation data is needed: give --val-data or a positive --val-ratio")
    if args.preset:
        args.init_from = None  # random weights: recorded as such in the checkpoint


def base_model(args: argparse.Namespace) -> GPTModel:
    """The pretrained (or, with --preset, random) GPT to fine-tune."""
    overrides = {} if args.drop_rate is None else {"drop_rate": args.drop_rate}
    if args.preset:
        return GPTModel(get_preset(args.preset, **overrides))
    from .weights import from_pretrained

    if _is_classifier(Path(args.init_from)):
        raise ValueError(f"--init-from {args.init_from} is a classifier checkpoint: continue its run with "
                         "--resume, or start from a language model")
    return from_pretrained(args.init_from, **overrides)


def _is_classifier(path: Path) -> bool:
    """Whether `path` is a checkpoint of ours that records class labels (loosely: any config.json)."""
    try:
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "labels" in (meta.get("train_args") or {})


def load_splits(args: argparse.Namespace, labels: Sequence[str] | None
                ) -> tuple[dict[str, tuple[list[str], list[str]]], list[str]]:
    """{split: (texts, labels)} for train / val / test, and the label set (from --data unless given)."""
    texts, found = read_examples(args.data, args.text_column, args.label_column, labels)
    labels = list(labels) if labels is not None else sort_labels(found)
    val_ratio = 0.0 if args.val_data else args.val_ratio
    test_ratio = 0.0 if args.test_data else args.test_ratio
    parts = split_indices(len(texts), val_ratio, test_ratio, args.seed)
    splits = {name: ([texts[i] for i in idx], [found[i] for i in idx])
              for name, idx in zip(("train", "val", "test"), parts, strict=True)}
    for name, path in (("val", args.val_data), ("test", args.test_data)):
        if path:
            splits[name] = read_examples(path, args.text_column, args.label_column, labels)
    for name in ("train", "val"):
        if not splits[name][0]:
            raise DataError(f"the {name} split of {args.data} is empty ({len(texts)} examples): "
                            "add data or change --val-ratio / --test-ratio")
    return splits, labels


def setup(args: argparse.Namespace) -> tuple[Trainer, dict[str, TensorDataset]]:
    """Data, model, optimizer and run directory of a (fresh or resumed) fine-tuning run."""
    check_args(args)
    out_dir = Path(args.out_dir or default_out_dir(args.data))
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} exists and is not a directory")
    tokenizer = get_tokenizer()
    torch.manual_seed(args.seed)
    model = load_classifier(args.resume) if args.resume else None
    splits, labels = load_splits(args, model.labels if model else None)
    tokens = {name: tokenize(texts, tokenizer) for name, (texts, _) in splits.items()}
    if model is None:
        base = base_model(args)
        ctx = base.cfg.context_length
        if args.max_length is not None and args.max_length > ctx:
            raise ValueError(f"--max-length {args.max_length} exceeds the model's context length {ctx}")
        max_length = args.max_length or min(ctx, max(map(len, tokens["train"])))
        model = GPTClassifier.from_gpt(base, labels, max_length).train()
        del base
    freeze(model, args.trainable_blocks)
    datasets = {name: make_dataset(tokens[name], splits[name][1], labels, model.max_length) for name in splits}

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
    # The label set and the resolved max length travel in the checkpoint's train_args: that is
    # what `load_classifier` rebuilds the classifier from.
    saved = {k: v for k, v in vars(args).items() if k not in ("resume", "progress", "command")}
    saved.update(labels=labels, max_length=model.max_length)
    trainer = Trainer(model, cfg, datasets["train"], datasets["val"], ClassificationTask(), out_dir, saved)
    if args.resume:
        trainer.restore(load_trainer_state(args.resume))
    else:
        trainer.metrics_file.unlink(missing_ok=True)
    truncated = {name: sum(len(t) > model.max_length for t in tokens[name]) for name in tokens}
    print(f"labels: {', '.join(labels)}; texts padded / truncated to {model.max_length} tokens "
          f"(truncated: {', '.join(f'{n} {s}' for s, n in truncated.items())})", file=sys.stderr)
    for name, dataset in datasets.items():
        if len(dataset):
            print(f"{name}: {balance(dataset.tensors[2], labels)}", file=sys.stderr)
    return trainer, datasets


def train_command(args: argparse.Namespace) -> int:
    trainer, datasets = setup(args)
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n = args.trainable_blocks
    blocks = "everything" if n is None else f"the last {n} block(s), final norm and head"
    print(f"model: {model.num_parameters():,} parameters, {trainable:,} trainable ({blocks}); "
          f"{trainer.total_steps} steps on {trainer.device}", file=sys.stderr)
    result = trainer.fit()
    report = {name: evaluate_dataset(model, dataset, args.batch_size, trainer.device)
              for name, dataset in datasets.items() if len(dataset)}
    trainer.log({"event": "report", "step": trainer.state.step, **report})
    for name, scores_ in report.items():
        print(format_scores(name, scores_))
    print(f"{result['steps']} steps in {result['seconds']:.0f} s")
    print(f"checkpoint: {result['checkpoint']}\nmetrics: {result['metrics']}\nplot: {result['plot']}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model = load_classifier(resolve_checkpoint(args.checkpoint), device)
    texts, labels = read_examples(args.data, args.text_column, args.label_column, model.labels)
    dataset = make_dataset(tokenize(texts, get_tokenizer()), labels, model.labels, model.max_length)
    print(f"{Path(args.data).name}: {balance(dataset.tensors[2], model.labels)}", file=sys.stderr)
    print(format_scores(Path(args.data).name, evaluate_dataset(model, dataset, args.batch_size, device)))
    return 0


def predict_command(args: argparse.Namespace) -> int:
    model = load_classifier(resolve_checkpoint(args.checkpoint), resolve_device(args.device))
    if args.texts:
        texts = args.texts
    elif args.input == "-":
        texts = sys.stdin.read().splitlines()
    else:
        texts = Path(args.input).read_text(encoding="utf-8").splitlines()
    texts = [t for t in texts if t.strip()]  # blank lines have nothing to classify
    if not texts:
        raise ValueError("no text to classify: pass texts as arguments, or lines with --input or on stdin")
    for text, (label, p) in zip(texts, predict(model, texts, get_tokenizer(), args.batch_size), strict=True):
        print(f"{label}\t{p:.4f}\t{text}")
    return 0


COMMANDS = {"train": train_command, "evaluate": evaluate_command, "predict": predict_command}


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()
    try:
        args = parse_args(argv)
        if getattr(args, "batch_size", 1) <= 0:
            raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, UnicodeDecodeError, NonFiniteLoss,
            RuntimeError) as e:  # DataError and CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
