"""`python -m minigpt.inspect`: look inside a GPT: embedding neighbours, hidden states, attention, sizes.

    python -m minigpt.inspect neighbors hospital --checkpoint runs/medical
    python -m minigpt.inspect hidden-states "Every effort moves you" --pretrained gpt2
    python -m minigpt.inspect attention "Every effort moves you" --layer 3 --all --pretrained gpt2
    python -m minigpt.inspect summary --preset gpt2-medium
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import tiktoken
import torch

from ..errors import ConfigError
from ..inspection import attention_maps, hidden_states, nearest_neighbors, summary, token_labels
from ..model import GPTModel
from ..tokenizer import get_tokenizer, text_to_token_ids
from .common import add_model_source, load_model_from_args, positive_int, run


def _encode(text: str, tokenizer: tiktoken.Encoding, model: GPTModel) -> torch.Tensor:
    idx = text_to_token_ids(text, tokenizer)
    model.check_token_ids(idx)  # a text too long, or ids past a small model's vocabulary
    return idx.to(model.tok_emb.weight.device)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header], *([str(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_neighbors(args: argparse.Namespace, model: GPTModel) -> None:
    tokenizer = get_tokenizer()
    found = nearest_neighbors(model, tokenizer, args.word, k=args.k)
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(args.word)]
    print(f"nearest tokens to {args.word!r} (tokens {pieces}) by cosine similarity:")
    print(_table(["rank", "id", "token", "cosine"],
                 [(r, n.token_id, repr(n.token), f"{n.similarity:.4f}") for r, n in enumerate(found, 1)]))


def _cmd_hidden_states(args: argparse.Namespace, model: GPTModel) -> None:
    tokenizer = get_tokenizer()
    idx = _encode(args.text, tokenizer, model)
    states = hidden_states(model, idx)
    labels = token_labels(tokenizer, idx[0].tolist())
    print(f"L2 norm of each token's hidden state, {len(labels)} tokens, shape {tuple(idx.shape)} -> "
          f"{tuple(states['embedding'].shape)} per layer:")
    rows = [(name, f"{h[0].norm(dim=-1).mean():.2f}", *(f"{v:.2f}" for v in h[0].norm(dim=-1).tolist()))
            for name, h in states.items()]
    print(_table(["layer", "mean", *labels], rows))


def _cmd_attention(args: argparse.Namespace, model: GPTModel) -> None:
    from ..plot import plot_attention, plot_attention_grid  # matplotlib only for this command

    tokenizer = get_tokenizer()
    n_heads = model.cfg.n_heads
    if not 0 <= args.head < n_heads:
        raise ConfigError(f"head {args.head} does not exist; the model has heads 0..{n_heads - 1}")
    idx = _encode(args.text, tokenizer, model)
    weights = attention_maps(model, idx, args.layer)
    labels = token_labels(tokenizer, idx[0].tolist())
    out_dir = Path(args.out_dir)
    if args.all:
        path = plot_attention_grid(weights, labels, out_dir / f"attention-layer{args.layer}.png",
                                   title=f"layer {args.layer}: {args.text!r}")
    else:
        path = plot_attention(weights[args.head], labels,
                              out_dir / f"attention-layer{args.layer}-head{args.head}.png",
                              title=f"layer {args.layer}, head {args.head}")
    print(f"wrote {path}")


def _cmd_summary(args: argparse.Namespace, model: GPTModel) -> None:
    rows = summary(model)
    print(_table(["module", "type", "parameters", "count"], [(*r[:3], f"{r.params:,}") for r in rows]))
    print(f"total parameters: {model.num_parameters():,} "
          f"({model.num_parameters(exclude_output_head=True):,} without the output head, as GPT-2 counts)")
    print(f"size: {model.memory_mb(torch.float32):.2f} MB in float32, "
          f"{model.memory_mb(torch.bfloat16):.2f} MB in bfloat16")


def build_parser() -> argparse.ArgumentParser:
    source = argparse.ArgumentParser(add_help=False)
    add_model_source(source, seed=123, dtype=False)

    parser = argparse.ArgumentParser(prog="python -m minigpt.inspect", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("neighbors", parents=[source], help="nearest tokens in the embedding table")
    p.add_argument("word")
    p.add_argument("--k", type=positive_int, default=10, help="how many neighbours")
    p.set_defaults(run=_cmd_neighbors)
    p = commands.add_parser("hidden-states", parents=[source], help="norms of every layer's hidden states")
    p.add_argument("text")
    p.set_defaults(run=_cmd_hidden_states)
    p = commands.add_parser("attention", parents=[source], help="attention heatmap(s) of one layer as PNG")
    p.add_argument("text")
    p.add_argument("--layer", type=int, default=0, help="block index, from 0")
    p.add_argument("--head", type=int, default=0, help="head index, from 0 (ignored with --all)")
    p.add_argument("--all", action="store_true", help="a grid of every head of the layer")
    p.add_argument("--out-dir", default=".", help="where the PNG goes")
    p.set_defaults(run=_cmd_attention)
    p = commands.add_parser("summary", parents=[source], help="parameter counts, shapes and sizes")
    p.set_defaults(run=_cmd_summary)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args, load_model_from_args(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, argv)
