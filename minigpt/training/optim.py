"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                        fused: bool = True) -> torch.optim.AdamW:
    """AdamW with weight decay on the Linear weight matrices only.

    Biases, LayerNorm scales/shifts and the embedding tables are not decayed: pulling them
    towards zero does not regularise anything useful (a tied output head counts as embedding).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = {}, {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay)[id(p)] = p
    groups = [{"params": list(decay.values()), "weight_decay": weight_decay},
              {"params": list(no_decay.values()), "weight_decay": 0.0}]
    # The fused kernel does the whole update in one pass instead of one per parameter tensor.
    fused = fused and device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `total_steps`."""
    min_lr = cfg.lr if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)
