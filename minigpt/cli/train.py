"""`python -m minigpt.train`: pretrain or fine-tune a GPT on text, resumable, on one or many processes.

The defaults reproduce the tutorial's chapter 5; `--resume` continues a run exactly, with the
checkpoint's flags as the defaults; under torchrun each rank runs this same command.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..backends import keep_freed_memory, optimize_for_cpu
from ..checkpoint import load_trainer_state
from ..config import ARITHMETIC_KINDS, LEGACY_ATTENTION, GPTConfig, get_preset, is_openai_architecture
from ..device import DTYPES, resolve_device
from ..distributed import DistInfo, init_distributed, shutdown
from ..errors import ConfigError
from ..finetune import peak_memory_mb
from ..loss import perplexity
from ..model import GPTModel, crop_context
from ..tokenizer import get_tokenizer
from ..training import LanguageModelTask, Trainer, TrainConfig
from ..training.config import LR_SCHEDULES
from ..training.checkpoints import claim_run_dir, recover_checkpoints
from .common import HelpFormatter, resume_defaults, run
from .finetune_args import FINETUNE_FLAGS, add_finetune_args, lora_config, prepare
from .train_data import add_data_args, check_data_args, load_splits

# The flags that define the model: a resumed run may not change them.
MODEL_FLAGS = ("context_length", "emb_dim", "n_layers", "n_heads", "drop_rate", "qkv_bias",
               "tie_weights", "arithmetic", "init")


class LegacyAttention(argparse.Action):
    """`--attention sdpa|reference`: the old name of `--arithmetic fast|tutorial`."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, LEGACY_ATTENTION[values])


def batches_or_all(text: str) -> int | None:
    """`--eval-iters`: a number of batches, or `all` (None)."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of batches or all, got {text!r}") from None


def build_parser(defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minigpt.train",
        description="Train a GPT on text. The defaults reproduce the tutorial's chapter 5: GPT-2 124M "
                    "with context 256 on the-verdict for 10 epochs.",
        formatter_class=HelpFormatter)
    d = TrainConfig()
    p.add_argument("--config", metavar="FILE.toml", default=None,
                   help="a recipe: a TOML file setting any of these flags (by name, without --); flags given "
                        "on the command line win")
    add_data_args(p, d)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="gpt2",
                   help="the tutorial's gpt2 (124M), gpt2-medium, gpt2-large, gpt2-xl (untied head, no Q/K/V "
                        "bias), tiny, or OpenAI's GPT-2 as released, what transformers builds: gpt2-hf, "
                        "gpt2-medium-hf, gpt2-large-hf, gpt2-xl-hf (tied head, Q/K/V biases, GPT-2 init)")
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
    g.add_argument("--init", choices=("gpt2", "torch"), default=None,
                   help="weight initialisation: torch (PyTorch's default, as the tutorial's model: its wide "
                        "N(0, 1) embeddings fit a short text within the chapter-5 run's 90 steps) or gpt2 "
                        "(the paper's std-0.02 init, slower to start at lr 5e-4); default: torch, or gpt2 for "
                        "the -hf presets")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps instead")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="after the warm-up: constant, cosine (to --min-lr) or linear (to --min-lr); default: "
                        "cosine if --min-lr is given, else constant")
    g.add_argument("--min-lr", type=float, default=d.min_lr,
                   help="the rate the schedule decays to (default: 10%% of --lr for cosine, 0 for linear)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help="warm-up as a fraction of the run's steps (rounded up), instead of --warmup-steps")
    g.add_argument("--adam-betas", type=float, nargs=2, metavar=("B1", "B2"), default=d.adam_betas,
                   help="AdamW's betas")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay on weight matrices")
    g.add_argument("--decay-embeddings", action="store_true",
                   help="also decay the embedding tables (as nanoGPT and Hugging Face's Trainer do)")
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
    g.add_argument("--eval-iters", type=batches_or_all, default=d.eval_iters,
                   help="batches per split and evaluation; all: the whole validation split (and as many "
                        "training batches)")
    g.add_argument("--log-interval", type=int, default=d.log_interval,
                   help="log the mean loss every N steps: the only steps where the host waits for the device")
    g.add_argument("--sample-prompt", default=d.sample_prompt, help="prompt of the sample printed each epoch")
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens,
                   help="tokens of each greedy sample (0: no samples, e.g. for a big model on a CPU)")
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
    add_finetune_args(p, "train only the last N blocks (+ final norm and head); all: every block; auto: "
                         "all, or 0 with --lora-rank (the adapters alone)")
    if defaults:
        p.set_defaults(**defaults)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject flag values no run can use, naming the flag."""
    for name in ("epochs", "batch_size", "grad_accum", "eval_iters", "keep_last", "context_length",
                 "max_steps", "save_interval", "stride"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.sample_tokens < 0:
        raise ConfigError(f"--sample-tokens must not be negative, got {args.sample_tokens}")
    TrainConfig.from_flags(vars(args)).check()
    check_data_args(args)


def default_out_dir(data: str) -> Path:
    return Path("runs") / Path(data).stem


def out_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.out_dir or default_out_dir(args.data))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse `argv`; `--config FILE.toml` sets defaults for any flag (the command line wins); with
    `--resume`, the checkpoint's flags are the defaults under those, and a flag that would change
    the model is an error naming the checkpoint's value."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config = pre.parse_known_args(argv)[0].config

    def parser(defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
        p = build_parser(defaults)
        if config:
            p.set_defaults(**config_defaults(p, Path(config)))
        return p

    # `--resume latest` picks the newest checkpoint once an interrupted re-save is undone.
    return resume_defaults(parser, argv, lambda a: recover_checkpoints(out_dir_of(a)),
                           (*MODEL_FLAGS, *FINETUNE_FLAGS, "preset", "init_from"), upgrade=upgrade_train_args)


def upgrade_train_args(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved flags of an older checkpoint in today's names (`attention` became `arithmetic`), and
    its schedule named as it ran (before `--lr-schedule`: cosine if `--min-lr` was set, else constant)."""
    saved = dict(saved)
    legacy = saved.pop("attention", None)
    if legacy is not None and saved.get("arithmetic") is None:
        saved["arithmetic"] = LEGACY_ATTENTION[legacy]
    if "lr_schedule" not in saved:
        saved["lr_schedule"] = "constant" if saved.get("min_lr") is None else "cosine"
    return saved


def config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """The flag values a TOML recipe sets, by destination; its keys are flag names without `--`
    (`lr-schedule` or `lr_schedule`). An unknown key or a value of the wrong type is a `ConfigError`
    naming the file and key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a valid TOML file: {e}") from None
    flags = {opt[2:].replace("-", "_"): (action, opt) for action in parser._actions
             for opt in action.option_strings if opt.startswith("--") and opt not in ("--help", "--config")}
    defaults = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in flags:
            close = difflib.get_close_matches(name, flags, n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}: not a flag of python -m minigpt.train{hint}")
        action, opt = flags[name]
        defaults[action.dest] = flag_value(action, opt, value, f"{path}: {key} = {value!r}")
    return defaults


def flag_value(action: argparse.Action, opt: str, value: Any, where: str) -> Any:
    """`value` from a TOML file as flag `opt` would store it, checked as argparse checks its text."""
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch: true or false
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value != (opt.startswith("--no-") or action.const is False)
    if action.nargs is not None:
        if not isinstance(value, list) or (isinstance(action.nargs, int) and len(value) != action.nargs):
            raise ConfigError(f"{where}: expected a list of {action.nargs} values")
        return [typed(action.type, v, where) for v in value]
    value = typed(action.type, value, where)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, action.choices))}")
    return LEGACY_ATTENTION[value] if isinstance(action, LegacyAttention) else value


def typed(kind: Callable[[str], Any] | None, value: Any, where: str) -> Any:
    """A TOML value as an argparse `type=kind` flag takes it: a number for int/float, text otherwise."""
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float)):
            raise ConfigError(f"{where}: expected {'an integer' if kind is int else 'a number'}")
        return kind(value)
    if kind is not None:
        try:
            return kind(value if isinstance(value, str) else str(value))
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string")
    return value


def model_config(args: argparse.Namespace) -> GPTConfig:
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if args.init is None and not is_openai_architecture(args.preset):
        overrides["init"] = "torch"  # the tutorial's model, as the chapter-5 run trains it
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
        from ..weights import from_pretrained  # a LoRA checkpoint reads its base through it

        model = from_pretrained(args.resume, fmt="minigpt").train()
    else:
        model = build_model(args)
        # Every rank starts from the same weights; dropout then draws a different stream per rank.
        torch.manual_seed(args.seed + dist_info.rank)
    if device.type == "cpu":
        optimize_for_cpu(model)
    summary = prepare(model, args, None if args.resume else lora_config(args, model), classifier=False)
    if summary and dist_info.is_main:
        print(summary, file=sys.stderr)
    train_set, val_set = load_splits(args, tokenizer, model.cfg.context_length, dist_info)

    out_dir.mkdir(parents=True, exist_ok=True)
    saved_args = {k: v for k, v in vars(args).items() if k not in ("resume", "progress", "overwrite", "config")}
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
            f"train / {len(trainer.val_set) if trainer.val_set is not None else 'no'} val windows; "
            f"global batch {sampler.global_batch * args.grad_accum}"
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
    losses = ", ".join(f"{split} loss {loss:.3f} (perplexity {perplexity(loss):.1f})"
                       for split, loss in (("train", final["train_loss"]), ("val", final.get("val_loss")))
                       if loss is not None)
    print(f"final: {losses}{'' if 'val_loss' in final else ', no validation'}; {result['steps']} steps in "
          f"{result['seconds']:.0f} s, {result['tokens_per_s']:.0f} tokens/s")
    print(f"checkpoint: {result['checkpoint']}\nmetrics: {result['metrics']}\nplot: {result['plot']}")
    print(f"peak memory: {peak_memory_mb(device):,.0f} MB")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()
    info = DistInfo.from_env()  # under torchrun each rank's errors name the rank
    return run(_main, argv, prefix=f"error (rank {info.rank})" if info.enabled else "error")
