"""Hugging Face GPT-2 files: load `GPT2LMHeadModel` checkpoints into `GPTModel`, and export to them.

The layout is GPT-2's (see `layout`) under other names: `transformer.h.0.attn.c_attn.weight`
is OpenAI's `h0/attn/c_attn/w`, Conv1D weights stored (in, out). Reading needs only
safetensors (or torch for `pytorch_model.bin`), never transformers or TensorFlow.

Output head: GPT-2 ties it to the token embedding. An untied `GPTModel` (`tie_weights=False`,
the tutorial's default) is exported with `tie_word_embeddings: false` and its own
`lm_head.weight`, which `GPT2LMHeadModel` honours, so both kinds round-trip exactly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoint import CONFIG_FILE, load_tensors_file
from ..config import GPTConfig
from ..errors import CheckpointError
from ..files import atomic_dir
from ..model import GPTModel
from .layout import HEAD, check_config, gpt2_targets, gpt2_tensors, load_gpt2_tensors

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
# Causal-mask buffers that older transformers versions saved with the weights.
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def gpt2_name(hf_name: str) -> str | None:
    """OpenAI's name for a Hugging Face tensor name; None for a mask buffer to skip.

    Names that are not GPT-2's come back unchanged, for the loader to report.
    """
    name = hf_name.removeprefix("transformer.")
    if name == "lm_head.weight":
        return HEAD
    if _MASK_BUFFER.fullmatch(name):
        return None
    if name in ("wte.weight", "wpe.weight"):
        return name.split(".")[0]
    *path, leaf = re.sub(r"^h\.(\d+)\.", r"h\1.", name).split(".")
    kind = "b" if leaf == "bias" else "g" if path[-1:] in (["ln_1"], ["ln_2"], ["ln_f"]) else "w"
    key = "/".join(path) + "/" + kind
    return key if leaf in ("weight", "bias") and gpt2_targets(key) is not None else hf_name


def hf_name(key: str) -> str:
    """The Hugging Face name of GPT-2 tensor `key` (inverse of `gpt2_name`)."""
    if key == HEAD:
        return "lm_head.weight"
    if key in ("wte", "wpe"):
        return f"transformer.{key}.weight"
    *path, leaf = key.split("/")
    path[0] = re.sub(r"^h(\d+)$", r"h.\1", path[0])
    return "transformer." + ".".join(path) + (".bias" if leaf == "b" else ".weight")


def read_hf_config(config_file: str | os.PathLike) -> GPTConfig:
    """The `GPTConfig` for a Hugging Face GPT-2 config.json (dropout off).

    Settings under which `GPT2LMHeadModel` computes something `GPTModel` does not are errors.
    """
    config_file = Path(config_file)
    try:
        c = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: unreadable ({e})") from e
    if c.get("model_type") != "gpt2":
        raise CheckpointError(f"{config_file}: model_type is {c.get('model_type')!r}, not 'gpt2'")
    n_embd = c.get("n_embd", 768)  # missing keys take GPT2Config's defaults
    supported = {
        "activation_function": lambda v: v in ("gelu_new", "gelu_pytorch_tanh"),  # GPT-2's tanh GELU
        "n_inner": lambda v: v in (None, 4 * n_embd),
        "layer_norm_epsilon": lambda v: v == 1e-5,
        "scale_attn_weights": lambda v: v is True,
        "scale_attn_by_inverse_layer_idx": lambda v: v is False,
        "add_cross_attention": lambda v: v is False,
    }
    bad = [f"{k}={c[k]!r}" for k, ok in supported.items() if k in c and not ok(c[k])]
    if bad:
        raise CheckpointError(f"{config_file}: GPTModel cannot reproduce {', '.join(bad)}")
    try:
        return GPTConfig(vocab_size=c.get("vocab_size", 50257), context_length=c.get("n_positions", 1024),
                         emb_dim=n_embd, n_heads=c.get("n_head", 12), n_layers=c.get("n_layer", 12),
                         drop_rate=0.0, qkv_bias=True, tie_weights=c.get("tie_word_embeddings", True))
    except ValueError as e:
        raise CheckpointError(f"{config_file}: {e}") from e


def _weight_files(path: Path) -> list[Path]:
    """The weight file(s) of a checkpoint given as a directory or as one of its files."""
    if path.is_file():
        return [path]
    if (path / SAFETENSORS_FILE).is_file():
        return [path / SAFETENSORS_FILE]
    if (path / SAFETENSORS_INDEX).is_file():  # sharded: the index maps each tensor to its file
        try:
            weight_map = json.loads((path / SAFETENSORS_INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path / SAFETENSORS_INDEX}: unreadable ({e})") from e
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / TORCH_FILE).is_file():
        return [path / TORCH_FILE]
    raise CheckpointError(f"{path}: no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {TORCH_FILE}")


def _read_weights(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], Iterator[tuple[str, torch.Tensor]]]:
    """The shape of every tensor, and the tensors (from safetensors, one at a time)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if files[0].suffix != ".safetensors":
        state = load_tensors_file(files[0])
        return {k: tuple(v.shape) for k, v in state.items()}, iter(state.items())
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: corrupt or truncated ({e})") from e

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            with safe_open(str(file), "pt") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)

    return shapes, tensors()


def load_hf(path: str | os.PathLike, **config_overrides: Any) -> GPTModel:
    """A float32 `GPTModel` on the CPU from a Hugging Face GPT-2 directory or weights file.

    Reads config.json (beside the file) and model.safetensors (or its shards) or
    pytorch_model.bin (with `weights_only=True`).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    config_file = (path.parent if path.is_file() else path) / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: a Hugging Face checkpoint needs its config.json")
    cfg = read_hf_config(config_file)
    shapes, tensors = _read_weights(_weight_files(path))
    names = {k: gpt2_name(k) for k in shapes}
    check_config(cfg, {names[k]: s for k, s in shapes.items() if names[k]}, str(config_file))
    model = GPTModel(cfg.replace(**config_overrides))
    # A tied checkpoint may still store lm_head.weight: it is wte again, and transformers skips it too.
    skip = {None, HEAD} if cfg.tie_weights else {None}
    load_gpt2_tensors(model, ((names[k], v) for k, v in tensors if names[k] not in skip), str(path))
    return model


def hf_config(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A Hugging Face `GPT2Config` dict for `cfg`."""
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "scale_attn_weights": True, "tie_word_embeddings": cfg.tie_weights,
        "dtype": str(dtype).removeprefix("torch."),
    }
    # GPT-2's <|endoftext|>, where the vocabulary has it (GPT2Config would default to it anyway).
    eos = 50256 if cfg.vocab_size > 50256 else None
    return {**config, "bos_token_id": eos, "eos_token_id": eos}


def save_hf(model: GPTModel, path: str | os.PathLike) -> Path:
    """Write `model` as a Hugging Face GPT-2 directory (config.json + model.safetensors), atomically.

    `transformers.GPT2LMHeadModel.from_pretrained(path)` loads it and gives the same logits.
    Weights keep the model's dtype.
    """
    tensors = {hf_name(k): v.cpu() for k, v in gpt2_tensors(model)}
    path = Path(path)
    with atomic_dir(path) as tmp:
        # transformers refuses safetensors files without this metadata.
        save_file(tensors, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        config = hf_config(model.cfg, model.tok_emb.weight.dtype)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path
