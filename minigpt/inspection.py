"""Looking inside a GPTModel: embedding neighbours, hidden states, attention maps, sizes.

`python -m minigpt.inspect` (`minigpt.cli.inspect`) prints and draws them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import tiktoken
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .model import GPTModel


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
        raise ConfigError(f"k must be at least 1, got {k}")
    ids = tokenizer.encode(word)
    if not ids:
        raise ConfigError("cannot look up neighbours of an empty word")
    table = model.tok_emb.weight.float()
    # Rows past the tokenizer's vocabulary (a padded table) have no token to show.
    n_vocab = min(table.shape[0], tokenizer.n_vocab)
    if max(ids) >= n_vocab:
        raise ConfigError(f"{word!r} has token id {max(ids)}, outside the model's vocabulary of {n_vocab}")
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
        raise ConfigError(f"layer {layer} does not exist; the model has layers 0..{n_layers - 1}")


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
    attention over tokens 0..i, as the tutorial's attention computes it.
    """
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ConfigError(f"attention_maps takes one sequence, (1, tokens) or (tokens,), "
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
