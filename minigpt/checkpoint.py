"""Saving and loading models and training state, atomically and without pickle.

A model directory holds `config.json` (the `GPTConfig`) and `model.safetensors`.
A training checkpoint is a model directory plus `trainer.pt` (optimizer, schedule
position, data position, RNG states, arguments), read back with `weights_only=True`.
Directories are written under a temporary name and renamed into place, so a crash or
Ctrl-C never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import GPTConfig
from .model import GPTModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
FORMAT = "minigpt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or of another shape."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `path` only if the block succeeds.

    An existing `path` is replaced; on error the temporary directory is removed and
    `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file via a temporary file and rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_tensors(model: GPTModel, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state (or `state`, e.g. gathered from shards) as contiguous tensors,
    a tied output head stored once."""
    state = dict(model.state_dict() if state is None else state)
    if model.cfg.tie_weights:
        state.pop("out_head.weight")
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_model(model: GPTModel, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
               extra_files: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` as a minigpt model directory at `path` (atomically).

    `extra_files` maps file names to objects saved beside it with `torch.save`
    (plain containers of tensors and numbers only, so they load with `weights_only=True`).
    `state` replaces `model.state_dict()`, e.g. when the weights were gathered from shards.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(model_tensors(model, state), str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        config = {"format": FORMAT, "config": model.cfg.to_dict(), **(metadata or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, obj in (extra_files or {}).items():
            torch.save(obj, tmp / name)
    return path


def read_config(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, Any]]:
    """The `GPTConfig` of a model directory, and the rest of its config.json."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: not a minigpt checkpoint ({CONFIG_FILE} is missing)")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        return GPTConfig.from_dict(meta.pop("config")), meta
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable config ({e})") from e


def load_state_into(model: GPTModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, naming any missing, unexpected or mis-shaped tensor."""
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - {"out_head.weight"})
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, **config_overrides: Any) -> GPTModel:
    """Load a model directory written by `save_model` (or a training checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    cfg, _ = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: corrupt or truncated ({e})") from e
    model = GPTModel(cfg.replace(**config_overrides))
    load_state_into(model, state, str(weights))
    return model.to(device=device, dtype=dtype).eval()


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The training state saved beside a checkpoint's weights (no code is unpickled)."""
    file = Path(path) / TRAINER_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: not a training checkpoint ({TRAINER_FILE} is missing)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, pickle errors, EOFError, ...
        raise CheckpointError(f"{file}: corrupt or truncated ({type(e).__name__}: {e})") from e
