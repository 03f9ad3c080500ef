"""Saving and loading models and training state, atomically and without pickle.

A model directory holds `config.json` (the `GPTConfig`, plus metadata such as the training
arguments; a classifier's record its labels) and `model.safetensors`.
A training checkpoint is a model directory plus `trainer.pt` (optimizer, schedule
position, data position, RNG states, arguments), read back with `weights_only=True`.
Directories are written under a temporary name and renamed into place, so a crash or
Ctrl-C never leaves a half-written checkpoint under the final name. config.json records the
size and sha256 of every other file (`files`), computed as it was written and checked on load.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import GPTConfig
from .errors import CheckpointError
from .files import HashingWriter, atomic_dir, check_storage, sha256_file
from .model import GPTModel

if TYPE_CHECKING:
    from .classifier import GPTClassifier

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "TRAINER_FILE", "FORMAT", "CheckpointError", "save_model", "load_model",
           "load_classifier", "read_config", "load_state_into", "load_trainer_state", "model_tensors",
           "load_tensors_file", "verify_file"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
FORMAT = "minigpt"


def model_tensors(model: GPTModel | GPTClassifier,
                  state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state (or `state`, e.g. gathered from shards) as contiguous tensors,
    a tied output head stored once."""
    state = dict(model.state_dict() if state is None else state)
    if model.cfg.tie_weights:
        state.pop("out_head.weight")
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_model(model: GPTModel | GPTClassifier, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
               extra_files: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` as a minigpt model directory at `path` (atomically).

    `extra_files` maps file names to objects saved beside it with `torch.save`
    (plain containers of tensors and numbers only, so they load with `weights_only=True`).
    `state` replaces `model.state_dict()`, e.g. when the weights were gathered from shards.
    A full disk or a file-size limit is a `StorageError` naming the file; `path` is then untouched.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        files = {WEIGHTS_FILE: _save_weights(model_tensors(model, state), tmp / WEIGHTS_FILE, path / WEIGHTS_FILE)}
        for name, obj in (extra_files or {}).items():
            files[name] = _save_object(obj, tmp / name, path / name)
        config = {"format": FORMAT, "config": model.cfg.to_dict(), **(metadata or {}), "files": files}
        text = json.dumps(config, indent=2) + "\n"
        try:
            (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
        except OSError as e:
            check_storage(e, path / CONFIG_FILE)
            raise
    return path


def _save_weights(tensors: dict[str, torch.Tensor], tmp: Path, final: Path) -> dict[str, Any]:
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    except (SafetensorError, OSError) as e:
        check_storage(e, final)
        raise
    return {"size": tmp.stat().st_size, "sha256": sha256_file(tmp)}


def _save_object(obj: Any, tmp: Path, final: Path) -> dict[str, Any]:
    with open(tmp, "wb") as f:
        writer = HashingWriter(f)
        try:
            torch.save(obj, writer)
            f.flush()
        except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError
            check_storage(writer.error or e, final)
            raise
    return {"size": tmp.stat().st_size, "sha256": writer.digest.hexdigest()}


def verify_file(directory: Path, name: str, meta: dict[str, Any]) -> Path:
    """`directory / name`, after checking it has the size and sha256 its config.json recorded
    (checkpoints written before checksums were recorded are not checked)."""
    file = directory / name
    recorded = (meta.get("files") or {}).get(name)
    if recorded is None:
        return file
    if file.stat().st_size != recorded.get("size"):
        raise CheckpointError(f"{file}: corrupt or truncated ({file.stat().st_size} bytes, "
                              f"{recorded.get('size')} when saved)")
    if sha256_file(file) != recorded.get("sha256"):
        raise CheckpointError(f"{file}: corrupt or truncated (its sha256 differs from the one recorded "
                              "when it was saved: the file was damaged)")
    return file


def read_config(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, Any]]:
    """The `GPTConfig` of a model directory, and the rest of its config.json."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: not a minigpt checkpoint ({CONFIG_FILE} is missing)")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable config ({e})") from e
    for key, value in (("the file", meta), *((k, meta.get(k)) for k in ("config", "train_args", "files")
                                           if isinstance(meta, dict))):
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{file}: unreadable config ({key} is a JSON {type(value).__name__}, "
                                  "not an object)")
    try:
        return GPTConfig.from_dict(meta.pop("config")), meta
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable config ({type(e).__name__}: {e})") from e


def load_state_into(model: GPTModel | GPTClassifier, state: dict[str, torch.Tensor], source: str) -> None:
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


def _read_weights(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} is missing")
    verify_file(path, WEIGHTS_FILE, meta)
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: corrupt or truncated ({e})") from e


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, **config_overrides: Any) -> GPTModel | GPTClassifier:
    """Load a model directory written by `save_model` (or a training checkpoint), in eval mode.

    A classifier checkpoint (its config.json records `train_args.labels`) gives a
    `minigpt.classifier.GPTClassifier`, any other a `GPTModel`.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    cfg, meta = read_config(path)
    state = _read_weights(path, meta)
    cfg = cfg.replace(**config_overrides)
    train_args = meta.get("train_args") or {}
    if "labels" in train_args:
        from .classifier import GPTClassifier  # only classifier checkpoints need it

        model = GPTClassifier(cfg, train_args["labels"], train_args.get("max_length"))
    else:
        model = GPTModel(cfg)
    load_state_into(model, state, str(path / WEIGHTS_FILE))
    return model.to(device=device, dtype=dtype).eval()


def load_classifier(path: str | os.PathLike, device: torch.device | str = "cpu") -> GPTClassifier:
    """A classifier checkpoint written by `python -m minigpt.classify train`, in eval mode."""
    _, meta = read_config(path)
    if "labels" not in (meta.get("train_args") or {}):
        raise CheckpointError(f"{path}: not a classifier checkpoint (its config.json records no labels); "
                              "make one with python -m minigpt.classify train")
    return load_model(path, device)


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The training state saved beside a checkpoint's weights (no code is unpickled)."""
    path = Path(path)
    file = path / TRAINER_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: not a training checkpoint ({TRAINER_FILE} is missing)")
    if (path / CONFIG_FILE).is_file():
        verify_file(path, TRAINER_FILE, read_config(path)[1])
    return load_tensors_file(file)


def load_tensors_file(file: Path) -> Any:
    """A `torch.save` file of tensors and plain containers, read with `weights_only=True`: a file
    holding anything else (pickled code) is refused, never run."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{file}: corrupt or truncated (UnpicklingError: {e})") from None
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (it calls {found[1]})" if found else ""
        # Deliberately not torch's advice to load it with weights_only=False: that runs the code.
        raise CheckpointError(f"{file}: contains code, not only tensors{what}; it was not loaded: "
                              "it may be malicious") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for a damaged file
        raise CheckpointError(f"{file}: corrupt or truncated ({type(e).__name__}: {e})") from e
