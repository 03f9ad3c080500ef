"""`python -m minigpt.classify train|evaluate|predict`: fine-tune a GPT as a text classifier.

The library it drives is `minigpt.classifier`; the training loop is `minigpt.training.Trainer`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ..backends import keep_freed_memory, optimize_for_cpu
from ..checkpoint import CONFIG_FILE, load_trainer_state, read_config
from ..classifier import (ClassificationTask, GPTClassifier, balance, evaluate_dataset, format_scores,
                          make_dataset, predict, read_examples, sort_labels, split_indices, tokenize)
from ..config import get_preset
from ..device import DTYPES, resolve_device
from ..errors import CheckpointError, ConfigError, DataError
from ..finetune import peak_memory_mb
from ..lora import LoRAConfig, has_lora
from ..model import GPTModel
from ..tokenizer import get_tokenizer
from ..training import Trainer, TrainConfig, list_checkpoints
from ..training.checkpoints import claim_run_dir, recover_checkpoints
from .common import HelpFormatter, resume_defaults, run
from .finetune_args import FINETUNE_FLAGS, add_finetune_args, lora_config, prepare

# Flags that shape the model: a resumed run must keep them.
MODEL_ARGS = ("init_from", "preset", "drop_rate", "max_length", *FINETUNE_FLAGS)


def build_parser(train_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command's flags; `train_defaults` (a checkpoint's arguments) become train's defaults."""
    p = argparse.ArgumentParser(prog="python -m minigpt.classify",
                                description="Fine-tune a GPT as a text classifier, evaluate it, predict with it.")
    sub = p.add_subparsers(dest="command", required=True)
    formatter = HelpFormatter
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
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps instead")
    g.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="cosine floor (default: lr, no decay)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=None)
    g.add_argument("--max-bad-steps", type=int, default=1,
                   help="stop at this many steps in a row with a non-finite loss or gradients")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    g.add_argument("--seed", type=int, default=123, help="seeds the head, the split, dropout and batch order")
    g = t.add_argument_group("evaluation and output")
    g.add_argument("--eval-interval", type=int, default=50, help="evaluate every N steps (0: at the end only)")
    g.add_argument("--eval-iters", type=int, default=5, help="batches per split in those evaluations")
    g.add_argument("--out-dir", default=None, help="run directory (default: runs/<data name>-classifier)")
    g.add_argument("--save-interval", type=int, default=None, help="checkpoint every N steps (always at the end)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
    g.add_argument("--resume", default=None, help="a checkpoint directory, or 'latest' in --out-dir")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out-dir (its checkpoints and metrics are deleted)")
    g.add_argument("--report-to", choices=("none", "tensorboard", "wandb"), default="none")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_finetune_args(t, "train the last N transformer blocks (plus final norm and head); all: everything; "
                         "auto: 1 (the tutorial's), or 0 with --lora-rank (the adapters and the head)")
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


def _check_classifier(ckpt: Path, saved: dict[str, Any]) -> None:
    if "labels" not in saved:
        raise CheckpointError(f"{ckpt}: not a classifier training checkpoint (no labels in its config.json)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse flags; `train --resume` takes its defaults from the checkpoint."""
    return resume_defaults(build_parser, argv, lambda a: recover_checkpoints(default_out_dir(a.data or "", a.out_dir)),
                           MODEL_ARGS, _check_classifier)


def default_out_dir(data: str, out_dir: str | None = None) -> Path:
    """--out-dir, or runs/<data name>-classifier."""
    return Path(out_dir) if out_dir else Path("runs") / f"{Path(data).stem}-classifier"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's newest checkpoint."""
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_FILE).is_file() and list_checkpoints(path):
        return list_checkpoints(path)[-1]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    return path


def check_args(args: argparse.Namespace) -> None:
    if not args.data:
        raise ConfigError("train needs --data: a labelled .csv or .jsonl file")
    for name in ("epochs", "batch_size", "grad_accum", "eval_iters", "keep_last", "max_steps", "save_interval",
                 "max_length"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    TrainConfig.from_flags(vars(args)).check()
    val_ratio, test_ratio = _ratios(args)
    if not (0 <= val_ratio < 1 and 0 <= test_ratio < 1 and val_ratio + test_ratio < 1):
        raise ConfigError(f"--val-ratio ({args.val_ratio}) and --test-ratio ({args.test_ratio}) must be in [0, 1) "
                          "and leave some training data")
    if not args.val_data and not val_ratio:
        raise ConfigError("validation data is needed: give --val-data or a positive --val-ratio")
    if args.preset:
        args.init_from = None  # random weights: recorded as such in the checkpoint


def _ratios(args: argparse.Namespace) -> tuple[float, float]:
    """The fractions of --data split off for validation and test (0 where a file is given)."""
    return 0.0 if args.val_data else args.val_ratio, 0.0 if args.test_data else args.test_ratio


def base_model(args: argparse.Namespace) -> GPTModel:
    """The pretrained (or, with --preset, random) GPT to fine-tune."""
    overrides = {} if args.drop_rate is None else {"drop_rate": args.drop_rate}
    if args.preset:
        return GPTModel(get_preset(args.preset, **overrides))
    from ..weights import from_pretrained

    if _is_classifier(Path(args.init_from)):
        raise ConfigError(f"--init-from {args.init_from} is a classifier checkpoint: continue its run with "
                          "--resume, or start from a language model")
    return from_pretrained(args.init_from, **overrides)


def _is_classifier(path: Path) -> bool:
    """Whether `path` is a checkpoint of ours that records class labels."""
    try:
        _, meta = read_config(path)
    except CheckpointError:  # a GPT-2 name, or Hugging Face's or OpenAI's files
        return False
    return "labels" in (meta.get("train_args") or {})


def load_splits(args: argparse.Namespace, labels: Sequence[str] | None
                ) -> tuple[dict[str, tuple[list[str], list[str]]], list[str]]:
    """{split: (texts, labels)} for train / val / test, and the label set (from --data unless given)."""
    texts, found = read_examples(args.data, args.text_column, args.label_column, labels)
    labels = list(labels) if labels is not None else sort_labels(found)
    parts = split_indices(len(texts), *_ratios(args), args.seed)
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


def _new_classifier(args: argparse.Namespace, labels: list[str],
                    train_tokens: list[list[int]]) -> tuple[GPTClassifier, LoRAConfig | None]:
    """A classifier on the pretrained base, and the LoRA settings naming that base (if --lora-rank)."""
    base = base_model(args)
    ctx = base.cfg.context_length
    if args.max_length is not None and args.max_length > ctx:
        raise ConfigError(f"--max-length {args.max_length} exceeds the model's context length {ctx}")
    max_length = args.max_length or min(ctx, max(map(len, train_tokens)))
    lora = lora_config(args, base)
    return GPTClassifier.from_gpt(base, labels, max_length).train(), lora


def setup(args: argparse.Namespace) -> tuple[Trainer, dict[str, TensorDataset]]:
    """Data, model, optimizer and run directory of a (fresh or resumed) fine-tuning run."""
    check_args(args)
    out_dir = default_out_dir(args.data, args.out_dir)
    torch.manual_seed(args.seed)
    model = _read_classifier(args.resume) if args.resume else None
    splits, labels = load_splits(args, model.labels if model else None)
    tokenizer = get_tokenizer()
    tokens = {name: tokenize(texts, tokenizer) for name, (texts, _) in splits.items()}
    model, lora = (model, None) if model else _new_classifier(args, labels, tokens["train"])
    summary = prepare(model, args, lora, classifier=True)
    if summary:
        print(summary, file=sys.stderr)
    datasets = {name: make_dataset(tokens[name], splits[name][1], labels, model.max_length) for name in splits}
    for dataset in datasets.values():
        if len(dataset):
            model.check_token_ids(dataset.tensors[0])
    if resolve_device(args.device).type == "cpu":
        optimize_for_cpu(model.gpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig.from_flags(vars(args))
    # The label set and the resolved max length travel in the checkpoint's train_args: that is
    # what `load_model` rebuilds the classifier from.
    saved = {k: v for k, v in vars(args).items() if k not in ("resume", "progress", "command", "overwrite")}
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
    check_args(args)
    with claim_run_dir(default_out_dir(args.data, args.out_dir), bool(args.resume), args.overwrite):
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    trainer, datasets = setup(args)
    model = trainer.model
    n = args.trainable_blocks
    blocks = "everything" if n is None else f"the last {n} block(s), final norm and head"
    lora = " and the LoRA adapters" if has_lora(model) else ""
    print(f"model: {model.num_parameters():,} parameters; training {blocks}{lora}; "
          f"{trainer.total_steps} steps on {trainer.device}", file=sys.stderr)
    result = trainer.fit()
    report = {name: evaluate_dataset(model, dataset, args.batch_size, trainer.device)
              for name, dataset in datasets.items() if len(dataset)}
    trainer.log({"event": "report", "step": trainer.state.step, **report})
    for name, scores_ in report.items():
        print(format_scores(name, scores_))
    print(f"{result['steps']} steps in {result['seconds']:.0f} s")
    print(f"checkpoint: {result['checkpoint']}\nmetrics: {result['metrics']}\nplot: {result['plot']}")
    print(f"peak memory: {peak_memory_mb(trainer.device):,.0f} MB")
    return 0


def _read_classifier(path: Path | str, device: torch.device | str = "cpu") -> GPTClassifier:
    from ..weights import load_classifier  # the weights package reads a LoRA checkpoint's base

    return load_classifier(path, device)


def _load(args: argparse.Namespace) -> GPTClassifier:
    model = _read_classifier(resolve_checkpoint(args.checkpoint), resolve_device(args.device))
    optimize_for_cpu(model.gpt)
    return model


def evaluate_command(args: argparse.Namespace) -> int:
    model = _load(args)
    texts, labels = read_examples(args.data, args.text_column, args.label_column, model.labels)
    dataset = make_dataset(tokenize(texts, get_tokenizer()), labels, model.labels, model.max_length)
    model.check_token_ids(dataset.tensors[0])
    device = next(model.parameters()).device
    print(f"{Path(args.data).name}: {balance(dataset.tensors[2], model.labels)}", file=sys.stderr)
    print(format_scores(Path(args.data).name, evaluate_dataset(model, dataset, args.batch_size, device)))
    return 0


def predict_command(args: argparse.Namespace) -> int:
    model = _load(args)
    if args.texts:
        texts = args.texts
    elif args.input == "-":
        texts = sys.stdin.read().splitlines()
    elif Path(args.input).is_dir():
        raise ConfigError(f"--input {args.input} is a directory; give a file with one text per line")
    else:
        texts = Path(args.input).read_text(encoding="utf-8").splitlines()
    texts = [t for t in texts if t.strip()]  # blank lines have nothing to classify
    if not texts:
        raise ConfigError("no text to classify: pass texts as arguments, or lines with --input or on stdin")
    for text, (label, p) in zip(texts, predict(model, texts, get_tokenizer(), args.batch_size), strict=True):
        print(f"{label}\t{p:.4f}\t{text}")
    return 0


COMMANDS = {"train": train_command, "evaluate": evaluate_command, "predict": predict_command}


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    if getattr(args, "batch_size", 1) <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    return COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()
    return run(_main, argv)
