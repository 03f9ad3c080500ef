"""Looking inside a GPTModel: embedding neighbours, hidden states, attention maps, sizes.

    python -m minigpt.inspect neighbors hospital --checkpoint runs/medical
    python -m minigpt.inspect hidden-states "Every effort moves you" --pretrained gpt2
    python -m minigpt.inspect attention "Every effort moves you" --layer 3 --all --pretrained gpt2
    python -m minigpt.inspect summary --preset gpt2-medium
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import tiktoken
import torch
import torch.nn.functional as F

from .checkpoint import load_model
from .config import get_preset
from .device import resolve_device
from .model import GPTModel
from .tokenizer import get_tokenizer, text_to_token_ids


class Neighbor(NamedTuple):
    """A token near a word in the embedding table."""

    token_id: int
    token: str
    similarity: float


@torch.no_grad()
def nearest_neighbors(model: GPTModel, tokenizer: tiktoken.Encoding, word: str,
                      k: int = 10) -> list[Neighbor]:
    """The `k` tokens whose embedding is closest (cosine) to `word`'s, best first.

    A word spanning several tokens is the mean of their vectors; its own tokens are left out.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ids = tokenizer.encode(word)
    if not ids:
        raise ValueError("cannot look up neighbours of an empty word")
    table = model.tok_emb.weight.float()
    # Rows past the tokenizer's vocabulary (a padded table) have no token to show.
    n_vocab = min(table.shape[0], tokenizer.n_vocab)
    if max(ids) >= n_vocab:
        raise ValueError(f"{word!r} has token id {max(ids)}, outside the model's vocabulary of {n_vocab}")
    query = table[ids].mean(dim=0)
    similarities = F.cosine_similarity(query.unsqueeze(0), table[:n_vocab], dim=-1)
    similarities[ids] = -torch.inf
    k = min(k, n_vocab - len(set(ids)))
    top = similarities.topk(k)
    return [Neighbor(i, tokenizer.decode([i]), s)
            for i, s in zip(top.indices.tolist(), top.values.tolist(), strict=True)]


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    # Dropout off, so hidden states are what inference sees; the caller's mode is restored.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def hidden_state_names(model: GPTModel) -> list[str]:
    """`embedding`, `block_0` ... `block_{n-1}`, `final_norm`: the keys of `hidden_states`."""
    return ["embedding", *(f"block_{i}" for i in range(len(model.trf_blocks))), "final_norm"]


@torch.no_grad()
def hidden_states(model: GPTModel, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every layer's output for token ids (batch, tokens), in order, in eval mode.

    The embedding sum (token + position), each transformer block's output, and the final
    LayerNorm's output, each (batch, tokens, emb_dim); `model.out_head` of the last one is
    `model(idx)`. Forward hooks capture them from the model's own forward pass.
    """
    modules = [model.drop_emb, *model.trf_blocks, model.final_norm]
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _inp, out: outputs.append(out)) for m in modules]
    try:
        with _eval_mode(model):
            model(idx)
    finally:
        for h in handles:
            h.remove()
    return dict(zip(hidden_state_names(model), outputs, strict=True))


def _check_layer(model: GPTModel, layer: int) -> None:
    n_layers = len(model.trf_blocks)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} does not exist; the model has layers 0..{n_layers - 1}")


@torch.no_grad()
def query_key_value(model: GPTModel, idx: torch.Tensor,
                    layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of block `layer`, each (batch, heads, tokens, head_dim)."""
    _check_layer(model, layer)
    # A block's input is the previous entry: the embedding for block 0, else block layer-1's output.
    block_input = list(hidden_states(model, idx).values())[layer]
    block = model.trf_blocks[layer]
    return block.att.qkv(block.norm1(block_input))


@torch.no_grad()
def attention_maps(model: GPTModel, idx: torch.Tensor, layer: int) -> torch.Tensor:
    """Causal attention weights of every head of block `layer`: (heads, tokens, tokens).

    `idx` is one sequence, (1, tokens) or (tokens,). Row i is how token i spreads its
    attention over tokens 0..i, as the reference attention path computes it.
    """
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"attention_maps takes one sequence, (1, tokens) or (tokens,), "
                         f"got {tuple(idx.shape)}")
    queries, keys, _ = query_key_value(model, idx, layer)
    return model.trf_blocks[layer].att.attention_weights(queries, keys)[0]


class ModuleRow(NamedTuple):
    """One line of `summary`: a module, its own parameters' shapes and their count."""

    name: str
    kind: str
    shapes: str
    params: int


def summary(model: torch.nn.Module) -> list[ModuleRow]:
    """One row per module holding parameters of its own: name, type, shapes, count.

    A shared (tied) parameter is counted at its first module only, so the counts add up
    to the model's distinct parameters.
    """
    rows: list[ModuleRow] = []
    first_owner: dict[int, str] = {}
    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        shapes, count = [], 0
        for pname, p in params:
            if id(p) in first_owner:
                shapes.append(f"{pname} = {first_owner[id(p)]}")
                continue
            first_owner[id(p)] = f"{name}.{pname}"
            shapes.append(f"{pname} {tuple(p.shape)}")
            count += p.numel()
        rows.append(ModuleRow(name, type(module).__name__, ", ".join(shapes), count))
    return rows


def token_labels(tokenizer: tiktoken.Encoding, ids: Sequence[int]) -> list[str]:
    """Each token as readable text: its decoded string with whitespace made visible."""
    return [repr(tokenizer.decode([i]))[1:-1].replace(" ", "␣") for i in ids]


# ---------------------------------------------------------------------------- CLI


def _load(args: argparse.Namespace) -> GPTModel:
    device = resolve_device(args.device)
    if args.checkpoint:
        return load_model(args.checkpoint, device=device)
    if args.pretrained:
        try:
            from .weights import from_pretrained
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.weights":
                raise
            raise ValueError("--pretrained needs minigpt.weights, which this installation lacks") from None
        return from_pretrained(args.pretrained).to(device).eval()
    torch.manual_seed(args.seed)
    return GPTModel(get_preset(args.preset)).to(device).eval()


def _encode(text: str, tokenizer: tiktoken.Encoding, model: GPTModel) -> torch.Tensor:
    # Text too long, or ids past a small model's vocabulary, fail in forward with a clear error.
    return text_to_token_ids(text, tokenizer).to(model.tok_emb.weight.device)


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
    from .plot import plot_attention, plot_attention_grid  # matplotlib only for this command

    tokenizer = get_tokenizer()
    n_heads = model.cfg.n_heads
    if not 0 <= args.head < n_heads:
        raise ValueError(f"head {args.head} does not exist; the model has heads 0..{n_heads - 1}")
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    source = argparse.ArgumentParser(add_help=False)
    which = source.add_argument_group("model (pick one)").add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="PATH", help="a minigpt model or checkpoint directory")
    which.add_argument("--pretrained", metavar="NAME|DIR", help="GPT-2 weights, e.g. gpt2 or gpt2-medium")
    which.add_argument("--preset", metavar="NAME", help="a randomly initialised model of a preset, e.g. tiny")
    source.add_argument("--seed", type=int, default=123, help="seed of the --preset model's init")
    source.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")

    parser = argparse.ArgumentParser(prog="python -m minigpt.inspect", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("neighbors", parents=[source], help="nearest tokens in the embedding table")
    p.add_argument("word")
    p.add_argument("--k", type=_positive_int, default=10, help="how many neighbours")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args, _load(args))
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
