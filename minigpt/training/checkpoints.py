"""A run's checkpoints: `<out_dir>/checkpoints/step-NNNNNN`, each a model directory plus `trainer.pt`.

`trainer.pt` holds what a resume needs besides the weights: the `TrainState`, the optimizer
(keyed by parameter name, so it loads with or without DDP/FSDP), the gradient scaler, every
rank's RNG state and the world size. The run's flags are in config.json's `train_args`.

A run holds an exclusive lock on its out-dir (`claim_run_dir`) for its lifetime. Checkpoints are
replaced and pruned so that the newest complete one is a `step-*` directory at every instant, and
a checkpoint whose weights gave a non-finite loss is never named as a good one.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CONFIG_FILE, TRAINER_FILE, save_model
from ..distributed import DistInfo
from ..errors import ConfigError, DirectoryInUse, StorageError
from ..files import clean_leftovers, lock_dir, remove_dir
from .config import TrainState


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name))


def trainer_payload(state: TrainState, optimizer_state: dict, scaler: torch.amp.GradScaler, rng: list,
                    world_size: int) -> dict[str, Any]:
    """The content of `trainer.pt` (`rng`: one CPU generator state per rank)."""
    return {"state": asdict(state), "optimizer": optimizer_state, "scaler": scaler.state_dict(), "rng": rng,
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "world_size": world_size}


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


def save_checkpoint(model: nn.Module, out_dir: Path, step: int, model_state: dict[str, torch.Tensor],
                    trainer: dict[str, Any], train_args: dict[str, Any], keep_last: int, good_step: int) -> Path:
    """Write the checkpoint of `step` (atomically), then `prune_checkpoints`. A full disk is one
    `StorageError` naming the file, and the checkpoints already there are untouched."""
    try:
        path = save_model(model, checkpoint_dir(out_dir, step), metadata={"step": step, "train_args": train_args},
                          extra_files={TRAINER_FILE: trainer}, state=model_state)
    except StorageError as e:
        kept = list_checkpoints(out_dir)
        previous = f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists"
        raise StorageError(f"checkpoint step-{step:06d} not saved: {e}; {previous}") from e
    prune_checkpoints(out_dir, keep_last, good_step)
    return path


def prune_checkpoints(out_dir: Path, keep_last: int, good_step: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, and the newest whose weights gave a finite
    loss (step <= `good_step`) as long as newer ones are unproven; each is renamed away first."""
    kept = list_checkpoints(out_dir)
    proven = [c for c in kept if step_of(c) <= good_step]
    keep = set(kept[-keep_last:]) | set(proven[-1:])
    for old in kept:
        if old not in keep:
            remove_dir(old)


def last_good_checkpoint(out_dir: Path, good_step: int, rename: bool = True) -> Path | None:
    """The newest checkpoint whose weights gave a finite loss; if `rename`, newer ones (which did
    not) become `step-N.nonfinite`, so that `--resume latest` cannot pick them."""
    kept = list_checkpoints(out_dir)
    for bad in (c for c in kept if step_of(c) > good_step and rename):
        bad.rename(bad.with_name(f"{bad.name}.nonfinite"))
    good = [c for c in kept if step_of(c) <= good_step]
    return good[-1] if good else None


def describe_run(out_dir: Path) -> str | None:
    """What earlier run `out_dir` holds ("a run of the-verdict, checkpoints up to step-000090"), if any."""
    kept = list_checkpoints(out_dir)
    if not kept and not (out_dir / "metrics.jsonl").exists():
        return None
    try:
        data = json.loads((kept[-1] / CONFIG_FILE).read_text(encoding="utf-8"))["train_args"]["data"]
        what = f"a run on {data}"
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        what = "a run"
    return f"{what}, checkpoints up to {kept[-1].name}" if kept else f"{what}, its metrics.jsonl"


def recover_checkpoints(out_dir: Path) -> Path:
    """Put back a checkpoint whose re-save was interrupted, unless a run holds `out_dir`; returns it."""
    if (out_dir / "checkpoints").is_dir():
        try:
            with _locked(out_dir):
                _tidy(out_dir)
        except DirectoryInUse:
            pass
    return out_dir


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    lock = lock_dir(out_dir)
    try:
        yield
    finally:
        lock.close()


def _tidy(out_dir: Path) -> None:
    for name in clean_leftovers(out_dir / "checkpoints"):
        print(f"restored {out_dir / 'checkpoints' / name} (its replacement was interrupted)", file=sys.stderr)
    clean_leftovers(out_dir)


@contextmanager
def claim_run_dir(out_dir: Path, resume: bool, overwrite: bool, enabled: bool = True) -> Iterator[None]:
    """Hold `out_dir` for one run: an exclusive lock (another run there is refused, a killed run
    releases it), interrupted writes tidied, and, unless `resume`, no earlier run destroyed without
    `overwrite`. `enabled=False` (ranks but the first) does nothing."""
    if not enabled:
        yield
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} exists and is not a directory")
    with _locked(out_dir):
        _tidy(out_dir)
        found = None if resume else describe_run(out_dir)
        if found and not overwrite:
            raise ConfigError(f"--out-dir {out_dir} holds {found}: continue it with --resume latest, "
                              "choose another --out-dir, or pass --overwrite to replace it")
        if found:
            for old in list_checkpoints(out_dir):
                remove_dir(old)
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        yield


def restore_rng(trainer: dict[str, Any], dist_info: DistInfo, seed: int, step: int) -> None:
    """This rank's random streams as they were, when the world size is the same; otherwise fresh
    streams derived from the seed and step (dropout then differs from an uninterrupted run)."""
    if trainer.get("world_size", 1) == dist_info.world_size:
        torch.set_rng_state(trainer["rng"][dist_info.rank])
    else:
        torch.manual_seed(seed + 7919 * step + dist_info.rank)
    if trainer["cuda_rng"] and torch.cuda.is_available() and not dist_info.enabled:
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])
