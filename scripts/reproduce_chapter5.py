"""The tutorial's chapter-5 pretraining run, step for step, on minigpt's functions.

This is the document's own code (seed 003, section 6.2) with its classes and helpers
imported from minigpt. With `init="torch"` and `arithmetic="tutorial"` the model is the
tutorial's, draw for draw, so on a CPU in float32 it prints the document's losses:
    Ep 1 (Step 000000): Train loss 9.558, Val loss 9.856  ...  Ep 10 (Step 000085): Train loss 0.762, Val loss 6.372

    python scripts/reproduce_chapter5.py [--data-dir DIR] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from minigpt.book import train_model_simple
from minigpt.data import create_dataloader_v1, resolve_corpus
from minigpt.model import GPTModel
from minigpt.tokenizer import get_tokenizer

GPT_CONFIG_124M = {
    "vocab_size": 50257, "ctx_len": 256, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
    "drop_rate": 0.1, "qkv_bias": False,
    "init": "torch", "arithmetic": "tutorial",  # the tutorial's exact model
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="where the-verdict.txt is (or is downloaded to)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the losses to this JSON file")
    args = parser.parse_args(argv)

    text_data = resolve_corpus("the-verdict", args.data_dir).read_text(encoding="utf-8")
    train_ratio = 0.90
    split_idx = int(train_ratio * len(text_data))
    torch.manual_seed(123)
    train_loader = create_dataloader_v1(text_data[:split_idx], batch_size=2, max_length=256, stride=256,
                                        drop_last=True, shuffle=True)
    val_loader = create_dataloader_v1(text_data[split_idx:], batch_size=2, max_length=256, stride=256,
                                      drop_last=False, shuffle=False)
    torch.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M)
    device = torch.device("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    start = time.perf_counter()
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, device, num_epochs=args.epochs, eval_freq=5, eval_iter=5,
        start_context="Every effort moves you", tokenizer=get_tokenizer())
    seconds = time.perf_counter() - start
    print(f"{len(train_losses)} evaluations in {seconds:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"train_losses": train_losses, "val_losses": val_losses, "tokens_seen": tokens_seen,
                       "seconds": seconds}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
