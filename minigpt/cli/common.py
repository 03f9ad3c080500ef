"""What every command shares: the error policy, loading a model from flags, resuming a run.

The error policy is in `run`: a user error (a `MinigptError`, or a `ValueError` / `OSError` raised
while checking input: a bad file, flag, value or checkpoint) is printed as one line naming the
problem and the command exits 2; Ctrl-C exits 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..backends import optimize_for_cpu
from ..backends.quantize import WEIGHT_FORMATS, quantize_weights
from ..checkpoint import CONFIG_FILE, load_model, read_config
from ..config import get_preset
from ..device import DTYPES, resolve_device
from ..errors import CheckpointError, ConfigError, MinigptError
from ..model import GPTModel
from ..training import list_checkpoints

USER_ERRORS = (MinigptError, ValueError, OSError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where it says nothing: a switch's True/False, an
    unset None, or a help text that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.nargs == 0 or action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def run(main: Callable[..., int], *args: Any, prefix: str = "error") -> int:
    """`main(*args)` under the one error policy: a command's `main(argv)` is `run(_main, argv)`."""
    try:
        return main(*args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_model_source(parser: argparse.ArgumentParser, required: bool = True, seed: int | None = None,
                     dtype: bool = True, weights: bool = False) -> None:
    """--checkpoint | --pretrained | --preset, and --device, --dtype, --seed; with `weights`, the
    inference-only --weights int8|bfloat16 (and --dtype int8, its shorthand)."""
    group = parser.add_argument_group("model (pick one)")
    which = group.add_mutually_exclusive_group(required=required)
    which.add_argument("--checkpoint", metavar="PATH", help="a minigpt model or training checkpoint directory")
    which.add_argument("--pretrained", metavar="NAME|DIR",
                       help="GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a checkpoint directory")
    which.add_argument("--preset", metavar="NAME", help="a randomly initialised model of a preset, e.g. tiny")
    group.add_argument("--seed", type=int, default=seed, help="seeds --preset's weights (and sampling)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    if dtype:
        choices = sorted(DTYPES) + (["int8"] if weights else [])
        shorthand = "; int8 is --weights int8 (float32 activations)" if weights else ""
        group.add_argument("--dtype", choices=choices, default="float32",
                           help="the model's dtype, weights and activations" + shorthand)
    if weights:
        group.add_argument("--weights", choices=WEIGHT_FORMATS, default=None,
                           help="store the linear layers' weights (output head included) as int8 with per-channel "
                                "scales or as bfloat16, for faster decoding; activations keep --dtype")


def model_formats(args: argparse.Namespace) -> tuple[torch.dtype, str | None]:
    """The model's float dtype and weight format (None: unquantized) from --dtype and --weights."""
    name, weights = getattr(args, "dtype", "float32"), getattr(args, "weights", None)
    if name == "int8":
        if weights not in (None, "int8"):
            raise ConfigError(f"--dtype int8 means --weights int8: it cannot be combined with --weights {weights}")
        return torch.float32, "int8"
    return DTYPES[name], weights


def load_model_from_args(args: argparse.Namespace, device: torch.device | None = None) -> GPTModel:
    """The model named by --checkpoint, --pretrained or --preset, in eval mode on `device`
    (default: --device), with the CPU backend applied on a CPU and its weights quantized
    for inference if --weights (or --dtype int8) asks."""
    device = device or resolve_device(args.device)
    dtype, weights = model_formats(args)
    if args.checkpoint and not is_adapter_checkpoint(args.checkpoint):
        model = load_model(args.checkpoint, device=device, dtype=dtype)
    elif args.checkpoint or args.pretrained:
        try:
            from ..weights import from_pretrained  # GPT-2 files, and a LoRA checkpoint's base
        except ModuleNotFoundError as e:
            if e.name != "minigpt.weights":
                raise
            raise MinigptError("--pretrained needs minigpt.weights, which this installation lacks") from None
        fmt = "minigpt" if args.checkpoint else None  # a LoRA checkpoint: its base, then its adapters
        model = from_pretrained(args.checkpoint or args.pretrained, device=device, dtype=dtype, fmt=fmt)
    else:
        if args.seed is not None:
            torch.manual_seed(args.seed)
        model = GPTModel(get_preset(args.preset)).to(device=device, dtype=dtype)
    model = optimize_for_cpu(model.eval())
    return model if weights is None else quantize_weights(model, weights)


def is_adapter_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a LoRA checkpoint: adapters that `from_pretrained` puts on their base."""
    return (Path(path) / CONFIG_FILE).is_file() and "lora" in read_config(path)[1]


def resolve_resume(resume: str, out_dir: Path) -> Path:
    """`--resume DIR` as given, or `--resume latest`: the newest checkpoint in `out_dir`."""
    if resume != "latest":
        return Path(resume)
    found = list_checkpoints(out_dir)
    if not found:
        raise CheckpointError(f"--resume latest: no checkpoint in {Path(out_dir) / 'checkpoints'}")
    return found[-1]


def resume_defaults(build_parser: Callable[..., argparse.ArgumentParser], argv: Sequence[str] | None,
                    out_dir: Callable[[argparse.Namespace], Path], fixed: Sequence[str],
                    check: Callable[[Path, dict[str, Any]], None] | None = None,
                    upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> argparse.Namespace:
    """Parse `argv`; with `--resume`, parse again with the checkpoint's saved flags as defaults.

    `build_parser(defaults=None)` builds the parser; `fixed` names the flags that define the model
    and may not change on resume (each difference is reported, with the checkpoint's value);
    `check(checkpoint, saved)` may reject a checkpoint of the wrong kind; `upgrade(saved)` renames
    an older checkpoint's flags.
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "resume", None) is None:
        return args
    ckpt = resolve_resume(args.resume, out_dir(args))
    cfg, meta = read_config(ckpt)
    saved = meta.get("train_args")
    if saved is None:
        raise CheckpointError(f"{ckpt}: not a training checkpoint (no train_args in its config.json)")
    if check is not None:
        check(ckpt, saved)
    saved = upgrade(saved) if upgrade is not None else saved
    args = build_parser(saved).parse_args(argv)
    args.resume = str(ckpt)

    def recorded(flag: str) -> Any:  # an unset model flag took the checkpoint config's value
        return getattr(cfg, flag) if saved.get(flag) is None and hasattr(cfg, flag) else saved.get(flag)

    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint: {recorded(k)})"
               for k in fixed if getattr(args, k) != saved.get(k)]
    if changed:
        raise ConfigError(f"cannot resume {ckpt} with a different model config: {', '.join(changed)}")
    return args
