"""GPT-2's published tensor layout and how it maps onto `GPTModel`.

OpenAI's TensorFlow checkpoint and Hugging Face's files hold the same tensors under
different names. Both are read and written here through one naming scheme, OpenAI's
variable names without their `model/` prefix: `wte`, `wpe`, `ln_f/g`, `h0/attn/c_attn/w`, ...

Two things differ from `GPTModel`'s own layout:
- GPT-2's projections are "Conv1D" layers whose weights `.../w` are stored (in, out),
  the transpose of `nn.Linear.weight` (out, in);
- `c_attn` is the query, key and value projections side by side, (C, 3C).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from ..config import GPTConfig

# GPT-2 name inside block `h{i}` -> GPTModel name inside `trf_blocks.{i}`.
BLOCK_TENSORS: dict[str, str | tuple[str, ...]] = {
    "ln_1/g": "norm1.scale",
    "ln_1/b": "norm1.shift",
    "attn/c_attn/w": ("att.W_query.weight", "att.W_key.weight", "att.W_value.weight"),
    "attn/c_attn/b": ("att.W_query.bias", "att.W_key.bias", "att.W_value.bias"),
    "attn/c_proj/w": "att.out_proj.weight",
    "attn/c_proj/b": "att.out_proj.bias",
    "ln_2/g": "norm2.scale",
    "ln_2/b": "norm2.shift",
    "mlp/c_fc/w": "ff.layers.0.weight",
    "mlp/c_fc/b": "ff.layers.0.bias",
    "mlp/c_proj/w": "ff.layers.2.weight",
    "mlp/c_proj/b": "ff.layers.2.bias",
}
TOP_TENSORS = {"wte": "tok_emb.weight", "wpe": "pos_emb.weight",
               "ln_f/g": "final_norm.scale", "ln_f/b": "final_norm.shift"}
# Not a GPT-2 name: GPT-2 ties its output head to `wte`. Only untied checkpoints
# (Hugging Face's `lm_head.weight` with tie_word_embeddings=false) carry this tensor.
HEAD = "lm_head"
_BLOCK_KEY = re.compile(r"h(\d+)/(.+)")


def gpt2_targets(key: str) -> tuple[str | tuple[str, ...], bool] | None:
    """The GPTModel parameter name(s) for GPT-2 tensor `key`, and whether it is stored transposed.

    None for a name that is not part of GPT-2.
    """
    if key == HEAD:
        return "out_head.weight", False
    if key in TOP_TENSORS:
        return TOP_TENSORS[key], False
    m = _BLOCK_KEY.fullmatch(key)
    if m is None or m[2] not in BLOCK_TENSORS:
        return None
    names = BLOCK_TENSORS[m[2]]
    prefix = f"trf_blocks.{int(m[1])}."
    names = tuple(prefix + n for n in names) if isinstance(names, tuple) else prefix + names
    return names, key.endswith("/w")


class GPT2Loader:
    """Copy GPT-2-layout tensors into a model one at a time, checking every name and shape.

    Tensors are copied into the existing parameters, not swapped for new ones as the
    tutorial's `assign` does, so a tied output head stays tied; and one tensor at a time
    means a checkpoint can be read without holding a second full copy of the model.
    Call `finish()` at the end: it fails if any parameter was left at its random init.
    """

    def __init__(self, model: nn.Module, source: str) -> None:
        self.source = source
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.tied = model.out_head.weight is model.tok_emb.weight
        self.assigned: set[int] = set()  # ids, so a tied parameter counts once

    def _error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {message}")

    def add(self, key: str, value: np.ndarray | torch.Tensor) -> None:
        value = torch.as_tensor(value)
        if key == HEAD and self.tied:
            raise self._error("the checkpoint has a separate output head (lm_head) but the model ties it "
                              "to the token embedding; load it with tie_weights=False")
        found = gpt2_targets(key)
        if found is None:
            raise self._error(f"unexpected tensor {key!r}, not part of GPT-2")
        names, transposed = found
        names = names if isinstance(names, tuple) else (names,)
        missing = [n for n in names if n not in self.params]
        if missing:
            hint = " (GPT-2 has query/key/value biases: use qkv_bias=True)" if ".W_" in missing[0] else ""
            raise self._error(f"unexpected tensor {key!r}: the model has no {missing[0]}{hint}")
        # The shape this tensor must have as stored: the parameters' shapes, transposed for
        # Conv1D weights, side by side for c_attn.
        shape = tuple(self.params[names[0]].shape)
        shape = shape[::-1] if transposed else shape
        shape = shape[:-1] + (shape[-1] * len(names),)
        if tuple(value.shape) != shape:
            raise self._error(f"{key} has shape {tuple(value.shape)}, the model needs {shape} "
                              f"for {', '.join(names)}")
        for name, part in zip(names, value.chunk(len(names), dim=-1), strict=True):
            self._copy(name, part.T if transposed else part, key)

    def _copy(self, name: str, value: torch.Tensor, key: str) -> None:
        param = self.params[name]
        if id(param) in self.assigned:
            raise self._error(f"tensor {key!r} appears twice")
        with torch.no_grad():
            param.copy_(value)
        self.assigned.add(id(param))

    def finish(self) -> int:
        """Check that every parameter was loaded; return how many tensors were."""
        head, emb = self.params["out_head.weight"], self.params["tok_emb.weight"]
        if not self.tied and id(head) not in self.assigned and id(emb) in self.assigned:
            # GPT-2's output head *is* wte; an untied model starts from a copy of it,
            # as the tutorial's load_weights_into_gpt does.
            self._copy("out_head.weight", emb.detach(), "wte")
        missing = [n for n, p in self.params.items() if id(p) not in self.assigned]
        if missing:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise self._error(f"missing tensors: the checkpoint has nothing for {shown}; "
                              "they would be left at their random init")
        return len(self.assigned)


def load_gpt2_tensors(model: nn.Module, tensors: Iterable[tuple[str, Any]], source: str) -> int:
    """Load (GPT-2 name, array) pairs into `model`; see `GPT2Loader`."""
    loader = GPT2Loader(model, source)
    for key, value in tensors:
        loader.add(key, value)
    return loader.finish()


def flatten_params(params: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """The tutorial's nested `params` dict as (GPT-2 name, array) pairs.

    The tutorial keeps the final LayerNorm `ln_f/g`, `ln_f/b` at the top as `g`, `b`.
    """
    def walk(d: dict[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}/")
            else:
                yield prefix + k, v

    for key, value in params.items():
        if key == "blocks":
            for i, block in enumerate(value):
                yield from walk(block, f"h{i}/")
        elif key in ("g", "b"):
            yield f"ln_f/{key}", value
        else:
            yield from walk({key: value}, "")


def nest_params(tensors: Iterable[tuple[str, Any]], n_layer: int) -> dict[str, Any]:
    """(GPT-2 name, array) pairs as the tutorial's nested `params` dict (inverse of `flatten_params`)."""
    params: dict[str, Any] = {"blocks": [{} for _ in range(n_layer)]}
    for key, value in tensors:
        parts = key.split("/")
        target = params
        m = _BLOCK_KEY.fullmatch(key)
        if m is not None:
            target, parts = params["blocks"][int(m[1])], parts[1:]
        elif parts[0] == "ln_f":
            parts = parts[1:]
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return params


def assign(left: torch.Tensor, right: Any) -> nn.Parameter:
    """The tutorial's helper: `right` (an array or tensor) as a new Parameter shaped, typed and
    placed like `left`, which it is meant to replace; ValueError if the shapes differ.

    `load_weights_into_gpt` does not use it: it copies into the existing parameters, so a tied
    output head stays tied.
    """
    right = torch.as_tensor(right)
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"shape mismatch: left {tuple(left.shape)}, right {tuple(right.shape)}")
    return nn.Parameter(right.to(device=left.device, dtype=left.dtype, copy=True))


def load_weights_into_gpt(gpt: nn.Module, params: dict[str, Any]) -> None:
    """Copy the tutorial's `params` (from `download_and_load_gpt2`) into `gpt`.

    As in the tutorial, `gpt` needs GPT-2's shape, context length and `qkv_bias=True`.
    Unlike it, this checks every name and shape (errors name the parameter and both shapes)
    and fails if any parameter of `gpt` would be left at its random init.
    """
    load_gpt2_tensors(gpt, flatten_params(params), "params")


def check_config(cfg: GPTConfig, shapes: dict[str, tuple[int, ...]], config_file: str) -> None:
    """Raise if the hyperparameters in `config_file` disagree with the checkpoint's tensor shapes."""
    problems = []
    expected = {"wte": (cfg.vocab_size, cfg.emb_dim), "wpe": (cfg.context_length, cfg.emb_dim)}
    for key, shape in expected.items():
        if key in shapes and tuple(shapes[key]) != shape:
            problems.append(f"{key} is {tuple(shapes[key])}, the config implies {shape}")
    blocks = {int(m[1]) for m in map(_BLOCK_KEY.fullmatch, shapes) if m}
    if blocks and blocks != set(range(cfg.n_layers)):
        problems.append(f"it gives {cfg.n_layers} layers, the tensors hold blocks "
                        f"h{min(blocks)}..h{max(blocks)} ({len(blocks)} blocks)")
    if problems:
        raise CheckpointError(f"{config_file} disagrees with the tensors: " + "; ".join(problems))


def gpt2_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`model`'s parameters in GPT-2's layout (the inverse of `GPT2Loader`).

    A model without qkv biases gets zero `c_attn/b`, which computes the same thing;
    an untied model also yields its output head as `lm_head`.
    """
    params = dict(model.named_parameters())
    layout: list[tuple[str, str | tuple[str, ...]]] = list(TOP_TENSORS.items())
    for i in range(len(model.trf_blocks)):
        layout += [(f"h{i}/{key}", gpt2_targets(f"h{i}/{key}")[0]) for key in BLOCK_TENSORS]
    for key, names in layout:
        names = names if isinstance(names, tuple) else (names,)
        parts = []
        for name in names:
            p = params.get(name)
            if p is None:  # a missing qkv bias: zeros of the matching projection's width
                p = torch.zeros_like(params[name.replace(".bias", ".weight")][:, 0])
            parts.append(p.detach().T if key.endswith("/w") else p.detach())
        yield key, torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0].contiguous()
    if model.out_head.weight is not model.tok_emb.weight:
        yield HEAD, model.out_head.weight.detach().contiguous()
