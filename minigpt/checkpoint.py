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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import GPTConfig
from .errors import CheckpointError
from .files import HashingWriter, atomic_dir, check_storage, sha256_file
from .lora import LoRAConfig, apply_lora, has_lora, weights_fingerprint
from .model import GPTModel

if TYPE_CHECKING:
    from .classifier import GPTClassifier

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "TRAINER_FILE", "FORMAT", "CheckpointError", "save_model", "load_model",
           "read_config", "load_state_into", "load_trainer_state", "model_tensors",
           "load_tensors_file", "verify_file"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
FORMAT = "minigpt"


def model_tensors(model: GPTModel | GPTClassifier,
                  state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state (or `state`, e.g. gathered from shards) as contiguous tensors,
    a tied output head stored once; for a model with LoRA adapters, only what training changes
    (the parameters that require gradients: the adapters, a new head, unfrozen layers)."""
    state = dict(model.state_dict() if state is None else state)
    if has_lora(model):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    if model.cfg.tie_weights:
        state.pop("out_head.weight", None)
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
    head_config = getattr(model, "head_config", None)  # the heads of minigpt.heads say how to rebuild them
    if head_config is not None:
        metadata = {**(metadata or {}), "head": head_config()}
    lora = getattr(model, "lora_config", None)
    if lora is not None:
        if lora.base is None or lora.base_sha256 is None:
            raise CheckpointError(f"{path}: a LoRA model is saved as its adapters on top of its base: set "
                                  "lora_config.base (what from_pretrained reads it from) and base_sha256 "
                                  "(weights_fingerprint of the base), or merge_lora(model) first")
        metadata = {**(metadata or {}), "lora": lora.to_dict()}
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


def _expected(model: GPTModel | GPTClassifier, shapes: dict[str, tuple[int, ...]],
              source: str) -> dict[str, torch.Tensor]:
    """The model's tensors a state with these `shapes` must fill; a `CheckpointError` naming any
    missing, unexpected or mis-shaped one."""
    expected = model_tensors(model)
    if has_lora(model):  # the adapters, and whichever other parameters the run trained
        full = model.state_dict()
        expected = {k: v for k, v in full.items() if k in shapes or k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - {"out_head.weight"})
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, shape in shapes.items():
        if name in expected and shape != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: {name} has shape {shape}, the model expects "
                                  f"{tuple(expected[name].shape)}")
    return expected


def load_state_into(model: GPTModel | GPTClassifier, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, naming any missing, unexpected or mis-shaped tensor."""
    _expected(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict(state, strict=False)


def _read_weights_into(model: GPTModel | GPTClassifier, path: Path, meta: dict[str, Any]) -> None:
    """Copy the checkpoint's weights into `model` one tensor at a time: a model never sits in
    memory twice, however large."""
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} is missing")
    verify_file(path, WEIGHTS_FILE, meta)
    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        _expected(model, shapes, str(weights))
        state = model.state_dict()  # views of the parameters: copying into them loads them
        with torch.no_grad():
            for name in shapes:
                # The file is memory-mapped while open, and the pages read stay resident: opened
                # per tensor, the peak is the model plus its largest tensor, not twice the model.
                with safe_open(str(weights), "pt") as f:
                    if name in state:
                        state[name].copy_(f.get_tensor(name))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: corrupt or truncated ({e})") from e


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, base: GPTModel | None = None,
               **config_overrides: Any) -> GPTModel | GPTClassifier:
    """Load a model directory written by `save_model` (or a training checkpoint), in eval mode.

    A classifier checkpoint (its config.json records `train_args.labels`) gives a
    `minigpt.classifier.GPTClassifier`, any other a `GPTModel`. A LoRA checkpoint holds adapters
    only: `base` is the model they were trained on (checked against the fingerprint they
    recorded); `from_pretrained(path)` finds and loads it.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    cfg, meta = read_config(path)
    cfg = cfg.replace(**config_overrides)
    train_args = meta.get("train_args") or {}
    if "lora" in meta:
        model = _adapted(path, base, LoRAConfig(**meta["lora"]), train_args)
    elif "head" in meta:
        from .heads import build_head  # only head checkpoints need it

        model = build_head(cfg, meta["head"])
    elif "labels" in train_args:
        from .classifier import GPTClassifier  # only classifier checkpoints need it

        model = GPTClassifier(cfg, train_args["labels"], train_args.get("max_length"))
    else:
        model = GPTModel(cfg)
    _read_weights_into(model, path, meta)
    return model.to(device=device, dtype=dtype).eval()


def _adapted(path: Path, base: GPTModel | None, lora: LoRAConfig,
             train_args: dict[str, Any]) -> GPTModel | GPTClassifier:
    """`base` (checked) with the LoRA checkpoint's adapters (still untrained) and, for a classifier, its head."""
    if base is None:
        raise CheckpointError(f"{path}: a LoRA checkpoint (adapters on top of {lora.base}); load it with "
                              f"from_pretrained({str(path)!r}), which reads its base too, or pass base=")
    if weights_fingerprint(base) != lora.base_sha256:
        raise CheckpointError(f"{path}: its adapters were trained on other weights than the base given "
                              f"({lora.base}: fingerprint {weights_fingerprint(base)[:12]}, the checkpoint's "
                              f"{lora.base_sha256[:12]}); load them on the base they were trained on")
    model: GPTModel | GPTClassifier = base
    if "labels" in train_args:
        from .classifier import GPTClassifier

        model = GPTClassifier.from_gpt(base, train_args["labels"], train_args.get("max_length"))
    return apply_lora(model, lora)


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
