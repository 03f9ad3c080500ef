"""A run's checkpoints: `<out_dir>/checkpoints/step-NNNNNN`, each a model directory plus `trainer.pt`.

`trainer.pt` holds what a resume needs besides the weights: the `TrainState`, the optimizer
(keyed by parameter name, so it loads with or without DDP/FSDP), the gradient scaler, every
rank's RNG state and the world size. The run's flags are in config.json's `train_args`.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import TRAINER_FILE, save_model
from ..distributed import DistInfo
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


def save_checkpoint(model: nn.Module, out_dir: Path, step: int, model_state: dict[str, torch.Tensor],
                    trainer: dict[str, Any], train_args: dict[str, Any], keep_last: int) -> Path:
    """Write the checkpoint of `step` (atomically); keep the newest `keep_last`."""
    path = save_model(model, checkpoint_dir(out_dir, step), metadata={"step": step, "train_args": train_args},
                      extra_files={TRAINER_FILE: trainer}, state=model_state)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def restore_rng(trainer: dict[str, Any], dist_info: DistInfo, seed: int, step: int) -> None:
    """This rank's random streams as they were, when the world size is the same; otherwise fresh
    streams derived from the seed and step (dropout then differs from an uninterrupted run)."""
    if trainer.get("world_size", 1) == dist_info.world_size:
        torch.set_rng_state(trainer["rng"][dist_info.rank])
    else:
        torch.manual_seed(seed + 7919 * step + dist_info.rank)
    if trainer["cuda_rng"] and torch.cuda.is_available() and not dist_info.enabled:
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])
