"""The fine-tuning flags shared by `train` and `classify train`: LoRA, freezing, low-memory training."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ..device import DTYPES
from ..errors import ConfigError
from ..finetune import checkpoint_blocks, freeze, store_frozen_in, trainable_parameters
from ..lora import LORA_TARGETS, LoRAConfig, apply_lora, has_lora, mark_trainable, weights_fingerprint

# The fine-tuning flags a resumed run must keep (they decide which weights train, and how stored).
FINETUNE_FLAGS = ("lora_rank", "lora_alpha", "lora_targets", "trainable_blocks", "freeze_embeddings", "base_dtype")


def blocks(value: str) -> int | str | None:
    """--trainable-blocks: a count, 'all' (None) or 'auto' (resolved by `prepare`)."""
    if value in ("all", "auto"):
        return None if value == "all" else value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of blocks or 'all', got {value!r}") from None


def add_finetune_args(parser: argparse.ArgumentParser, trainable_blocks_help: str) -> None:
    """The "fine-tuning" group of a training command."""
    g = parser.add_argument_group("fine-tuning (LoRA, frozen layers, memory)")
    g.add_argument("--trainable-blocks", type=blocks, default="auto", help=trainable_blocks_help)
    g.add_argument("--lora-rank", type=int, default=None,
                   help="train rank-R LoRA adapters on the pretrained weights, which stay frozen (off if unset)")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help="the adapters' update is scaled by alpha / rank (default: the rank, a scale of 1)")
    g.add_argument("--lora-targets", default="attn",
                   help=f"comma-separated layers to adapt: {', '.join(LORA_TARGETS)} (attn = W_query, W_key, "
                        "W_value, out_proj; mlp = the feed-forward's two linears)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--freeze-embeddings", action="store_true",
                   help="freeze the token and position embeddings (with a tied head, the head too)")
    g.add_argument("--base-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="store the frozen linear weights in this dtype (they are multiplied in float32)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="keep only each block's input for the backward pass and recompute the rest there")


def lora_config(args: argparse.Namespace, base: nn.Module) -> LoRAConfig | None:
    """The run's LoRA settings, naming `base` (the pretrained model, as loaded) by --init-from."""
    if args.lora_rank is None:
        return None
    if not args.init_from:
        raise ConfigError("--lora-rank fine-tunes pretrained weights: give --init-from (a GPT-2 name or a checkpoint)")
    source = Path(args.init_from).expanduser()
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    config = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha or float(args.lora_rank), targets=targets,
                        dropout=args.lora_dropout, base=str(source.resolve()) if source.exists() else args.init_from)
    config.check()
    config.base_sha256 = weights_fingerprint(base)
    return config


def prepare(model: nn.Module, args: argparse.Namespace, lora: LoRAConfig | None, classifier: bool) -> str | None:
    """Freeze, add adapters (unless the model, resumed, has them), store frozen weights in
    --base-dtype and checkpoint activations, as the flags say; returns a one-line summary if
    not every parameter trains.

    --trainable-blocks auto becomes 0 with LoRA (the adapters, and a classifier's new head,
    train alone), else 1 for a classifier (the tutorial's) and all for a language model; the
    resolved value is written back to `args`, so a resumed run keeps it.
    """
    adapted = lora is not None or has_lora(model)
    tb = args.trainable_blocks
    if tb == "auto":
        tb = args.trainable_blocks = 0 if adapted else (1 if classifier else None)
    if adapted and tb is None:
        raise ConfigError("--trainable-blocks all with --lora-rank would train every weight; "
                          "give a number of blocks (or 0) to train besides the adapters")
    train_head = classifier or not adapted
    if tb is not None or args.freeze_embeddings:
        freeze(model, tb, train_head=train_head or bool(tb), freeze_embeddings=args.freeze_embeddings)
    if lora is not None and not has_lora(model):
        with torch.random.fork_rng(devices=[]):  # the same adapters on every rank, the run's RNG untouched
            torch.manual_seed(args.seed)
            apply_lora(model, lora)
    mark_trainable(model)
    if args.base_dtype != "float32":
        store_frozen_in(model, DTYPES[args.base_dtype])
    if args.grad_checkpointing:
        checkpoint_blocks(model)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    trainable = trainable_parameters(model)
    if trainable == total:
        return None
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
