"""Peak memory and time of one fine-tuning step: LoRA on a bfloat16 base with activation
checkpointing against full float32 fine-tuning, on GPT-2 shapes with random weights.

    python scripts/finetune_memory.py                       # GPT-2 124M (both runs) and XL (LoRA; full computed)
    python scripts/finetune_memory.py --presets gpt2-xl --full-too

Each run is `python -m minigpt.train` in its own process (batch 1 x 500 tokens, one step),
which prints its peak RSS; the base model is written once under --work in minigpt's format.
Full fine-tuning's AdamW state is computed too: 16 bytes per parameter (weight, gradient,
two moments) before activations.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from minigpt import GPTModel, get_preset, get_tokenizer, save_model

LORA = ["--lora-rank", "16", "--lora-targets", "attn", "--base-dtype", "bfloat16", "--grad-checkpointing"]


def write_base(preset: str, work: Path) -> Path:
    """GPT-2's released architecture (tied head, qkv biases) with random weights, saved once."""
    path = work / f"{preset}-base"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        save_model(GPTModel(get_preset(preset, tie_weights=True, qkv_bias=True, init="gpt2")), path)
    return path


def write_jokes(work: Path, source: Path) -> Path:
    """A stand-in for the short-jokes CSV (ID,Joke): lines of `source`, one "joke" per line."""
    path = work / "jokes.csv"
    lines = [line.strip().replace('"', "'") for line in source.read_text(encoding="utf-8").splitlines()]
    rows = [f'{i},"{line}"' for i, line in enumerate((line for line in lines if line), start=1)]
    path.write_text("ID,Joke\n" + "\n".join(rows[:3000]) + "\n", encoding="utf-8")
    return path


def run_step(base: Path, data: Path, out: Path, extra: list[str]) -> dict[str, float]:
    cmd = [sys.executable, "-m", "minigpt.train", "--init-from", str(base), "--data", str(data),
           "--text-column", "Joke", "--context-length", "500", "--batch-size", "1", "--max-steps", "1",
           "--eval-interval", "0", "--eval-iters", "1", "--no-progress", "--out-dir", str(out), "--overwrite",
           "--sample-tokens", "0", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    steps = re.search(r"(\d+) steps in (\d+) s", done.stdout)
    peak = re.search(r"peak memory: ([\d,]+) MB", done.stdout)
    trainable = re.search(r"trainable parameters: ([\d,]+)", done.stderr)
    return {"seconds": int(steps[2]) / int(steps[1]), "peak_mb": float(peak[1].replace(",", "")),
            "trainable": int(trainable[1].replace(",", "")) if trainable else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["gpt2", "gpt2-xl"])
    p.add_argument("--work", type=Path, default=Path("/tmp/minigpt-finetune-memory"))
    p.add_argument("--text", type=Path, default=None, help="text whose lines stand in for the jokes "
                   "(default: tinyshakespeare under $MINIGPT_DATA_DIR)")
    p.add_argument("--full-too", action="store_true", help="also run full fine-tuning on the largest preset")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    text = args.text or Path(os.environ.get("MINIGPT_DATA_DIR", "data")) / "tinyshakespeare.txt"
    data = write_jokes(args.work, text)
    get_tokenizer()
    print("| model | run | trainable parameters | peak RSS MB | s / step | full FT AdamW state (computed) |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        base = write_base(preset, args.work)
        with torch.device("meta"):  # the parameter count without allocating the weights
            total = GPTModel(get_preset(preset, tie_weights=True, qkv_bias=True)).num_parameters()
        runs = [("LoRA r16 attn, bf16 base, checkpointing", LORA)]
        if preset != "gpt2-xl" or args.full_too:  # XL's full fine-tuning needs ~25 GB before activations
            runs.append(("full fine-tuning, float32", []))
        for name, extra in runs:
            r = run_step(base, data, args.work / f"run-{preset}", extra)
            if "error" in r:
                print(f"| {preset} | {name} | | | | error: {r['error']} |")
                continue
            trainable = r["trainable"] or total
            print(f"| {preset} | {name} | {trainable:,} | {r['peak_mb']:,.0f} | {r['seconds']:.1f} | "
                  f"{16 * total / 2**30:.1f} GiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
