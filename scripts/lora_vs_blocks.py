"""LoRA against last-block fine-tuning of a GPT-2 classifier on one small task, side by side.

    python scripts/lora_vs_blocks.py [--base DIR] [--preset gpt2]

The task: tell a line of Shakespeare (tinyshakespeare) from a sentence of Edith Wharton's
"The Verdict", balanced, under $MINIGPT_DATA_DIR. The base is --base (pretrained weights in any
format `from_pretrained` reads) or, without one, a random GPT-2 of --preset written under --work.
Each variant is one `python -m minigpt.classify train` run; the table gives the trainable
parameters and the held-out test accuracy.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import torch

from minigpt import GPTModel, get_preset, save_model

VARIANTS = {
    "last block + final norm + head (the tutorial's)": ["--trainable-blocks", "1"],
    "LoRA r8 on all linears + head": ["--lora-rank", "8", "--lora-alpha", "16", "--lora-targets", "all",
                                      "--lr", "5e-4"],
}


def write_task(data_dir: Path, path: Path, per_class: int, seed: int) -> Path:
    verdict = (data_dir / "the-verdict.txt").read_text(encoding="utf-8")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(verdict.split())) if len(s.split()) >= 5]
    lines = [line.strip() for line in (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()
             if len(line.split()) >= 5]
    rng = random.Random(seed)
    n = min(per_class, len(sentences), len(lines))
    rows = [(t, "wharton") for t in rng.sample(sentences, n)] + [(t, "shakespeare") for t in rng.sample(lines, n)]
    rng.shuffle(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    return path


def run(base: str, data: Path, out: Path, extra: list[str], epochs: int) -> tuple[int | None, float | None]:
    cmd = [sys.executable, "-m", "minigpt.classify", "train", "--init-from", base, "--data", str(data),
           "--max-length", "48", "--epochs", str(epochs), "--batch-size", "8", "--eval-interval", "0",
           "--no-progress", "--out-dir", str(out), "--overwrite", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return None, None
    trainable = re.search(r"trainable parameters: ([\d,]+)", done.stderr)
    accuracy = re.search(r"^test: \d+ examples, loss [\d.]+, accuracy ([\d.]+)%", done.stdout, re.M)
    return int(trainable[1].replace(",", "")), float(accuracy[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="pretrained weights (default: a random GPT-2 of --preset)")
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--work", type=Path, default=Path("/tmp/minigpt-lora-vs-blocks"))
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data = write_task(Path(os.environ.get("MINIGPT_DATA_DIR", "data")), args.work / "task.csv", args.per_class, 0)
    base = args.base
    if base is None:
        base = str(args.work / f"{args.preset}-random")
        if not Path(base, "config.json").is_file():
            torch.manual_seed(0)
            save_model(GPTModel(get_preset(args.preset, tie_weights=True, qkv_bias=True, init="gpt2")), base)
    print(f"base: {base}; task: {data} ({2 * args.per_class} texts, 70/10/20 train/val/test)")
    print("| fine-tuning | trainable parameters | test accuracy |\n|---|---|---|")
    for i, (name, extra) in enumerate(VARIANTS.items()):
        trainable, accuracy = run(base, data, args.work / f"run-{i}", extra, args.epochs)
        print(f"| {name} | {trainable:,} | {accuracy:.2f}% |" if trainable else f"| {name} | failed | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
