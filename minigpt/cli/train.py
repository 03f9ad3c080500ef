"""`python -m minigpt.train`: pretrain or fine-tune a GPT on text, resumable, on one or many processes.

The defaults reproduce the tutorial's chapter 5; `--resume` continues a run exactly, with the
checkpoint's flags as the defaults; under torchrun each rank runs this same command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..backends import keep_freed_memory, optimize_for_cpu
from ..checkpoint import load_model, load_trainer_state
from ..config import ARITHMETIC_KINDS, LEGACY_ATTENTION, GPTConfig, get_preset
from ..device import DTYPES, resolve_device
from ..distributed import DistInfo, init_distributed, shutdown
from ..errors import ConfigError
from ..loss import perplexity
from ..model import GPTModel, crop_context
from ..tokenizer import get_tokenizer
from ..training import LanguageModelTask, Trainer, TrainConfig
from ..training.checkpoints import claim_run_dir, recover_checkpoints
from .common import resume_defaults, run
from .train_data import add_data_args, load_splits

# The flags that define the model: a resumed run may not change them.
MODEL_FLAGS = ("context_length", "emb_dim", "n_layers", "n_heads", "drop_rate", "qkv_bias",
               "tie_weights", "arithmetic", "init")


class LegacyAttention(argparse.Action):
    """`--attention sdpa|reference`: the old name of `--arithmetic fast|tutorial`."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, LEGACY_ATTENTION[values])


def build_parser(defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minigpt.train",
        description="Train a GPT on text. The defaults reproduce the tutorial's chapter 5: GPT-2 124M "
                    "with context 256 on the-verdict for 10 epochs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    add_data_args(p, d)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="gpt2", help="gpt2 (124M), gpt2-medium, gpt2-large, gpt2-xl or tiny")
    g.add_argument("--init-from", default=None, help="start from pretrained weights: gpt2, ... or a directory")
    g.add_argument("--context-length", type=int, default=256, help="tokens per window")
    g.add_argument("--emb-dim", type=int, default=None, help="override the preset's embedding size")
    g.add_argument("--n-layers", type=int, default=None, help="override the preset's layer count")
    g.add_argument("--n-heads", type=int, default=None, help="override the preset's head count")
    g.add_argument("--drop-rate", type=float, default=None, help="override the preset's dropout")
    g.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=None, help="biases on Q, K, V")
    g.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="share the output head with the token embedding")
    g.add_argument("--arithmetic", choices=ARITHMETIC_KINDS, default=None,
                   help="fast (fused kernels, the preset's default) or tutorial (the book's written-out "
                        "formulas, its numbers bit for bit)")
    g.add_argument("--attention", dest="arithmetic", choices=tuple(LEGACY_ATTENTION), action=LegacyAttention,
                   help="old name of --arithmetic: sdpa = fast, reference = tutorial")
    g.add_argument("--init", choices=("gpt2", "torch"), default="torch",
                   help="weight initialisation: torch (PyTorch's default, as the tutorial's model: its wide "
                        "N(0, 1) embeddings fit a short text within the chapter-5 run's 90 steps) or gpt2 "
                        "(the paper's std-0.02 init, the library default, slower to start at lr 5e-4)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps instead")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="cosine floor (default: lr, no decay)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay on weight matrices")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm (off if unset)")
    g.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps,
                   help="stop at this many steps in a row with a non-finite loss or gradients (each one's "
                        "update is skipped)")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype,
                   help="bfloat16/float16 train under autocast with float32 weights")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps (under torchrun: "
                   "cuda means one GPU per local rank)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun, shard parameters, gradients and "
                   "optimizer state over the ranks (FSDP) instead of replicating the model (DDP)")
    g.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a rank waits for the others before the job fails")
    g.add_argument("--compile", action="store_true", help="torch.compile the training step's model (the first "
                   "step then takes a minute or more to compile; needs a C++ compiler on the CPU)")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the weights, dropout and data order")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval, help="evaluate every N steps (0: never)")
    g.add_argument("--eval-iters", type=int, default=d.eval_iters, help="batches per evaluation")
    g.add_argument("--sample-prompt", default=d.sample_prompt, help="prompt of the sample printed each epoch")
    g.add_argument("--out-dir", default=d.out_dir, help="run directory (default: runs/<data name>)")
    g.add_argument("--save-interval", type=int, default=d.save_interval,
                   help="checkpoint every N steps (always at the end and on Ctrl-C)")
    g.add_argument("--keep-last", type=int, default=d.keep_last, help="checkpoints kept")
    g.add_argument("--resume", default=None, help="a checkpoint directory, or 'latest' in --out-dir")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out-dir (its checkpoints and metrics are deleted)")
    g.add_argument("--report-to", choices=("none", "tensorboard", "wandb"), default=d.report_to,
                   help="also send metrics there")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    if defaults:
        p.set_defaults(**defaults)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject flag values no run can use, naming the flag."""
    for name in ("epochs", "batch_size", "grad_accum", "eval_iters", "keep_last", "context_length",
                 "max_steps", "save_interval", "stride"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    TrainConfig.from_flags(vars(args)).check()
    if not 0 < args.val_ratio < 1:
        raise ConfigError(f"--val-ratio must be in (0, 1), got {args.val_ratio}")


def default_out_dir(data: str) -> Path:
    return Path("runs") / Path(data).stem


def out_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.out_dir or default_out_dir(args.data))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse `argv`; with `--resume`, the checkpoint's flags are the defaults, and a flag that would
    change the model is an error naming the checkpoint's value."""
    # `--resume latest` picks the newest checkpoint once an interrupted re-save is undone.
    return resume_defaults(build_parser, argv, lambda a: recover_checkpoints(out_dir_of(a)),
                           (*MODEL_FLAGS, "preset", "init_from"), upgrade=upgrade_train_args)


def upgrade_train_args(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved flags of an older checkpoint in today's names (`attention` became `arithmetic`)."""
    saved = dict(saved)
    legacy = saved.pop("attention", None)
    if legacy is not None and saved.get("arithmetic") is None:
        saved["arithmetic"] = LEGACY_ATTENTION[legacy]
    return saved


def model_config(args: argparse.Namespace) -> GPTConfig:
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    return get_preset(args.preset, **overrides)


def build_model(args: argparse.Namespace) -> GPTModel:
    """A fresh model of the flags' preset and overrides, or pretrained weights (`--init-from`)."""
    torch.manual_seed(args.seed)
    if not args.init_from:
        return GPTModel(model_config(args))
    from ..weights import from_pretrained  # the weights package is only needed here

    overrides = {k: getattr(args, k) for k in ("drop_rate", "arithmetic") if getattr(args, k) is not None}
    model = from_pretrained(args.init_from, **overrides)
    if args.context_length != model.cfg.context_length:
        crop_context(model, args.context_length)
    return model.train()


def setup(args: argparse.Namespace, dist_info: DistInfo | None = None,
          device: torch.device | None = None) -> Trainer:
    """Data, model, optimizer and run directory for `args` (fresh or resumed)."""
    check_args(args)
    dist_info = dist_info or DistInfo()
    device = device or resolve_device(args.device)
    cfg = TrainConfig.from_flags(vars(args))
    out_dir = out_dir_of(args)
    tokenizer = get_tokenizer()
    if args.resume:
        trainer_state = load_trainer_state(args.resume)
        model = load_model(args.resume).train()
    else:
        model = build_model(args)
        # Every rank starts from the same weights; dropout then draws a different stream per rank.
        torch.manual_seed(args.seed + dist_info.rank)
    if device.type == "cpu":
        optimize_for_cpu(model)
    train_set, val_set = load_splits(args, tokenizer, model.cfg.context_length, dist_info)

    out_dir.mkdir(parents=True, exist_ok=True)
    saved_args = {k: v for k, v in vars(args).items() if k not in ("resume", "progress", "overwrite")}
    task = LanguageModelTask(tokenizer, args.sample_prompt, cfg.sample_tokens)
    trainer = Trainer(model, cfg, train_set, val_set, task, out_dir, saved_args, dist_info, device, args.fsdp)
    if args.resume:
        trainer.restore(trainer_state)
    elif dist_info.is_main:
        trainer.metrics_file.unlink(missing_ok=True)  # a fresh run starts a fresh log
    return trainer


def describe(trainer: Trainer, args: argparse.Namespace) -> str:
    """The run in one line: model, data, batch and steps."""
    cfg, sampler, world_size = trainer.model.cfg, trainer.sampler, trainer.dist.world_size
    return (f"model: {trainer.model.num_parameters():,} parameters ({cfg.n_layers} layers, {cfg.n_heads} "
            f"heads, {cfg.emb_dim} dims, context {cfg.context_length}); data: {len(trainer.train_set)} "
            f"train / {len(trainer.val_set)} val windows; global batch {sampler.global_batch * args.grad_accum}"
            f" = {args.batch_size} per rank x {args.grad_accum} accumulated x {world_size} "
            f"rank(s); {trainer.total_steps} steps on {trainer.device}")


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    check_args(args)
    try:
        dist_info, device = init_distributed(args.device, args.dist_timeout)
        with claim_run_dir(out_dir_of(args), bool(args.resume), args.overwrite, dist_info.is_main):
            trainer = setup(args, dist_info, device)
            if dist_info.is_main:
                print(describe(trainer, args), file=sys.stderr)
            result = trainer.fit()
    finally:
        shutdown()
    if not dist_info.is_main:
        return 0
    final = result["final"]
    print(f"final: train loss {final['train_loss']:.3f} (perplexity {perplexity(final['train_loss']):.1f}), "
          f"val loss {final['val_loss']:.3f} (perplexity {perplexity(final['val_loss']):.1f}); "
          f"{result['steps']} steps in {result['seconds']:.0f} s, {result['tokens_per_s']:.0f} tokens/s")
    print(f"checkpoint: {result['checkpoint']}\nmetrics: {result['metrics']}\nplot: {result['plot']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()
    info = DistInfo.from_env()  # under torchrun each rank's errors name the rank
    return run(_main, argv, prefix=f"error (rank {info.rank})" if info.enabled else "error")
