"""`from_pretrained`: a ready `GPTModel` from a GPT-2 name or any checkpoint on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import CONFIG_FILE, FORMAT, load_model, read_config
from ..device import resolve_device
from ..errors import CheckpointError
from ..model import GPTModel, crop_context
from .download import default_models_dir, download_gpt2_files, openai_model_size
from .hf import load_hf
from .openai import HPARAMS_FILE, INDEX_FILE, load_openai

if TYPE_CHECKING:
    from ..classifier import GPTClassifier

FORMATS = ("openai", "hf", "minigpt")


def detect_format(path: str | os.PathLike) -> str:
    """"openai", "hf" or "minigpt" for a checkpoint directory or a file in one."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if (directory / HPARAMS_FILE).is_file() or (directory / INDEX_FILE).is_file():
        return "openai"
    config = directory / CONFIG_FILE
    if config.is_file():
        try:
            is_ours = json.loads(config.read_text(encoding="utf-8")).get("format") == FORMAT
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{config}: unreadable ({e})") from e
        return "minigpt" if is_ours else "hf"
    raise CheckpointError(f"{path}: not a checkpoint; expected OpenAI's hparams.json and model.ckpt.* "
                          "files, or a config.json with model.safetensors (Hugging Face or minigpt)")


def _is_gpt2_name(name: str) -> bool:
    try:
        openai_model_size(name)
        return True
    except ValueError:
        return False


def from_pretrained(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, *, fmt: str | None = None,
                    models_dir: str | os.PathLike | None = None, mirror_url: str | None = None,
                    **config_overrides: Any) -> GPTModel:
    """Load GPT-2 or a saved model, in eval mode, on `device`, in `dtype` (default float32).

    `name_or_path` is one of:
    - a GPT-2 name: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" or OpenAI's "124M", "355M",
      "774M", "1558M". OpenAI's checkpoint is downloaded once into `models_dir/<size>`
      (default `$MINIGPT_MODELS_DIR` or `~/.cache/minigpt/gpt2`), falling back to `mirror_url`.
      Names win over paths: write "./gpt2" for a local directory of that name;
    - a directory (or a file in it) holding an OpenAI checkpoint, a Hugging Face GPT-2
      checkpoint, or a minigpt model (see `checkpoint.save_model`); `fmt` forces which.

    GPT-2 weights get GPT-2's config (context 1024, qkv biases, tied head) with dropout 0;
    a minigpt model keeps its saved config. `config_overrides` change either, e.g.
    `drop_rate=0.1` to fine-tune. Reading OpenAI's format needs TensorFlow; convert it once
    with `python -m minigpt.convert` to load without.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")
    device = resolve_device(device)  # before a long download or read, not after
    name = str(name_or_path)
    if fmt in (None, "openai") and _is_gpt2_name(name):
        path, fmt = download_gpt2_files(name, models_dir or default_models_dir(), mirror_url), "openai"
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory, and not a GPT-2 model name "
                                  "(gpt2, gpt2-medium, gpt2-large, gpt2-xl, 124M, 355M, 774M, 1558M)")
        fmt = fmt or detect_format(path)
    directory = path if path.is_dir() else path.parent
    if fmt == "openai":
        model = load_openai(directory, **config_overrides)
    elif fmt == "hf":
        model = load_hf(path, **config_overrides)
    else:
        model = _load_minigpt(directory, models_dir, mirror_url, **config_overrides)
    return model.to(device=device, dtype=dtype).eval()


def _load_minigpt(directory: Path, models_dir: str | os.PathLike | None, mirror_url: str | None,
                  **config_overrides: Any) -> GPTModel:
    """A minigpt model directory; for a LoRA checkpoint, its base (read from where the checkpoint
    says, cropped to its context) with the adapters on top."""
    cfg, meta = read_config(directory)
    lora = meta.get("lora")
    if not isinstance(lora, dict):
        return load_model(directory, **config_overrides)
    overrides = {"drop_rate": cfg.drop_rate, "arithmetic": cfg.arithmetic, **config_overrides}
    base = from_pretrained(lora.get("base"), models_dir=models_dir, mirror_url=mirror_url, **overrides)
    if base.cfg.context_length != cfg.context_length:
        crop_context(base, cfg.context_length)
    return load_model(directory, base=base)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPTClassifier:
    """A classifier checkpoint written by `python -m minigpt.classify train` (a LoRA one with its
    base), in eval mode."""
    _, meta = read_config(path)
    if "labels" not in (meta.get("train_args") or {}):
        raise CheckpointError(f"{path}: not a classifier checkpoint (its config.json records no labels); "
                              "make one with python -m minigpt.classify train")
    return from_pretrained(path, device, fmt="minigpt")
