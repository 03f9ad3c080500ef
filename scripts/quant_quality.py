"""Quality of weight-only quantized inference: float32 against int8 and bfloat16 weights.

    python scripts/quant_quality.py --checkpoint runs/tinyshakespeare/checkpoints/step-000400
    python scripts/quant_quality.py --train-steps 400 --out-dir /tmp/qq   # trains a small model first

On a model trained by minigpt: the held-out perplexity (the validation tail of the training data,
as `python -m minigpt.eval perplexity --split val` scores it) of each weight format, and the
share of prompts (windows of the held-out text) whose first `--new-tokens` greedy tokens equal
float32's. Perplexity runs whole windows (the dequantized-tile products); greedy decoding one
token at a time (the direct few-row kernels): both paths are measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt.backends import optimize_for_cpu  # noqa: E402
from minigpt.backends.quantize import quantize_weights  # noqa: E402
from minigpt.checkpoint import load_model  # noqa: E402
from minigpt.data import split_tokens  # noqa: E402
from minigpt.evaluation import evaluate_perplexity  # noqa: E402
from minigpt.generation import generate  # noqa: E402
from minigpt.token_cache import load_token_ids  # noqa: E402
from minigpt.tokenizer import EOS_ID, get_tokenizer  # noqa: E402
from minigpt.training import list_checkpoints  # noqa: E402

# A small GPT (4 x 128, context 64, tied head) that learns tinyshakespeare's surface in minutes.
TRAIN_FLAGS = ["--preset", "gpt2", "--n-layers", "4", "--n-heads", "4", "--emb-dim", "128", "--context-length", "64",
               "--tie-weights", "--init", "gpt2", "--lr", "2e-3", "--lr-schedule", "cosine", "--batch-size", "8",
               "--drop-rate", "0", "--eval-interval", "100", "--eval-iters", "2", "--log-interval", "50"]


def train(out_dir: Path, steps: int, data: str) -> Path:
    """Train the small model with `python -m minigpt.train`; return its last checkpoint."""
    cmd = [sys.executable, "-m", "minigpt.train", "--data", data, *TRAIN_FLAGS, "--max-steps", str(steps),
           "--save-interval", str(steps), "--out-dir", str(out_dir), "--overwrite"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return list_checkpoints(out_dir)[-1]


def greedy_agreement(ref: list[list[int]], got: list[list[int]], prompt_len: int) -> tuple[float, float]:
    """(share of prompts whose new tokens all equal ref's, mean share of equal leading tokens)."""
    same, prefix = 0, 0.0
    for r, g in zip(ref, got, strict=True):
        new_r, new_g = r[prompt_len:], g[prompt_len:]
        same += new_r == new_g
        n = next((i for i, (a, b) in enumerate(zip(new_r, new_g, strict=True)) if a != b), len(new_r))
        prefix += n / max(len(new_r), 1)
    return same / len(ref), prefix / len(ref)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a minigpt checkpoint (default: train one, --train-steps)")
    p.add_argument("--data", default="tinyshakespeare", help="the training data (its validation tail is scored)")
    p.add_argument("--val-ratio", type=float, default=0.1)
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--out-dir", default="runs/quant-quality", help="where --train-steps trains")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--max-eval-tokens", type=int, default=None, help="score only the first N held-out tokens")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    ckpt = Path(args.checkpoint) if args.checkpoint else train(Path(args.out_dir), args.train_steps, args.data)
    tokenizer = get_tokenizer()
    base = optimize_for_cpu(load_model(ckpt))
    ids = load_token_ids(args.data, tokenizer).astype("int64")
    held_out = torch.as_tensor(split_tokens(ids, args.val_ratio, base.cfg.context_length)[1])
    held_out = held_out[:args.max_eval_tokens] if args.max_eval_tokens else held_out
    scored = torch.cat([torch.tensor([EOS_ID]), held_out])
    gap = (len(held_out) - args.prompt_tokens) // args.prompts
    prompts = [held_out[i * gap:i * gap + args.prompt_tokens].tolist() for i in range(args.prompts)]
    models = {"float32": base, "int8": quantize_weights(copy.deepcopy(base), "int8"),
              "bfloat16": quantize_weights(copy.deepcopy(base), "bfloat16")}
    results, ref_tokens = {}, None
    with torch.inference_mode():
        for name, model in models.items():
            ppl = evaluate_perplexity(model, scored, tokenizer, stride=base.cfg.context_length // 2).perplexity
            tokens = generate(model, prompts, args.new_tokens)
            ref_tokens = tokens if ref_tokens is None else ref_tokens
            share, prefix = greedy_agreement(ref_tokens, tokens, args.prompt_tokens)
            results[name] = {"perplexity": ppl, "vs_float32": ppl / results.get("float32", {"perplexity": ppl})
                             ["perplexity"] - 1, "same_greedy": share, "same_prefix": prefix,
                             "weights_mb": model.memory_mb()}
    print(f"{ckpt}: {len(held_out)} held-out tokens; {args.prompts} prompts of {args.prompt_tokens} tokens, "
          f"{args.new_tokens} greedy tokens each")
    same = f"same {args.new_tokens} greedy"
    print(f"{'weights':9} {'perplexity':>10} {'vs fp32':>8} {same:>15} {'same prefix':>12} {'MB':>7}")
    for name, r in results.items():
        print(f"{name:9} {r['perplexity']:10.3f} {r['vs_float32']:+8.3%} {r['same_greedy']:15.0%} "
              f"{r['same_prefix']:12.0%} {r['weights_mb']:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(ckpt), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
