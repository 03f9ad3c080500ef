"""Convert GPT-2 weights between formats.

    python -m minigpt.convert --from openai|hf|minigpt SRC --to hf|minigpt DST

Convert OpenAI's TensorFlow checkpoint once, and later loads are fast and need no TensorFlow:

    python -m minigpt.convert --from openai gpt2 --to minigpt models/gpt2-124M

SRC is a checkpoint directory (or a file in it); with `--from openai` it may also be a
GPT-2 name ("gpt2", "124M", ...), downloaded if needed as by `from_pretrained`. A LoRA
checkpoint is exported with `--merge-lora`: its adapters folded into its base's weights.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..checkpoint import save_model
from ..errors import ConfigError
from ..lora import has_lora, merge_lora
from ..weights import from_pretrained, save_hf
from .common import run

SOURCES = ("openai", "hf", "minigpt")
TARGETS = ("hf", "minigpt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minigpt.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", nargs=2, metavar=("FORMAT", "SRC"), required=True,
                        help=f"source format ({'|'.join(SOURCES)}) and checkpoint")
    parser.add_argument("--to", dest="target", nargs=2, metavar=("FORMAT", "DST"), required=True,
                        help=f"target format ({'|'.join(TARGETS)}) and output directory")
    parser.add_argument("--models-dir", help="where GPT-2 names are downloaded "
                        "(default $MINIGPT_MODELS_DIR or ~/.cache/minigpt/gpt2)")
    parser.add_argument("--mirror-url", help="base URL to fall back on if OpenAI's download fails")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--merge-lora", action="store_true",
                        help="fold a LoRA checkpoint's adapters into its base weights (a plain model)")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    (src_format, src), (dst_format, dst) = args.source, args.target
    if src_format not in SOURCES:
        raise ConfigError(f"--from: unknown format {src_format!r}; choose one of {', '.join(SOURCES)}")
    if dst_format not in TARGETS:
        raise ConfigError(f"--to: unknown format {dst_format!r}; choose one of {', '.join(TARGETS)}")
    dst_path = Path(dst)
    if dst_path.exists() and not args.overwrite:
        raise ConfigError(f"{dst} already exists; pass --overwrite to replace it")
    model = from_pretrained(src, fmt=src_format, models_dir=args.models_dir, mirror_url=args.mirror_url)
    if has_lora(model):
        if not args.merge_lora:
            raise ConfigError(f"{src} is a LoRA checkpoint (adapters on top of {model.lora_config.base}); "
                              "pass --merge-lora to fold them into the weights")
        merge_lora(model)
    if dst_format == "hf":
        save_hf(model, dst_path)
    else:
        save_model(model, dst_path)
    print(f"wrote {dst_format} checkpoint {dst} ({model.num_parameters(exclude_output_head=True):,} "
          f"parameters, from {src_format} {src})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, argv)
