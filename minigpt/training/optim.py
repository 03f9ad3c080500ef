"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                        fused: bool = True, betas: tuple[float, float] = (0.9, 0.999),
                        decay_embeddings: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on the Linear weight matrices only (and the embedding tables if
    `decay_embeddings`, as nanoGPT and Hugging Face's Trainer do).

    Biases, LayerNorm scales/shifts and, by default, the embedding tables are not decayed: pulling
    them towards zero does not regularise anything useful (a tied output head counts as embedding).
    """
    embeddings = set() if decay_embeddings else {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = {}, {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay)[id(p)] = p
    groups = [{"params": list(decay.values()), "weight_decay": weight_decay},
              {"params": list(no_decay.values()), "weight_decay": 0.0}]
    # The fused kernel does the whole update in one pass instead of one per parameter tensor.
    fused = fused and device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), fused=fused)


def schedule_of(cfg: TrainConfig) -> tuple[str, float]:
    """The schedule's name and the rate it decays to. Unnamed, it is cosine if `min_lr` is set and
    constant otherwise (the chapter-5 run); cosine's floor defaults to 10% of lr (nanoGPT's),
    linear's to 0 (Hugging Face's `get_linear_schedule_with_warmup`)."""
    kind = cfg.lr_schedule or ("constant" if cfg.min_lr is None else "cosine")
    if kind == "constant":
        return kind, cfg.lr
    if cfg.min_lr is not None:
        return kind, cfg.min_lr
    return kind, 0.1 * cfg.lr if kind == "cosine" else 0.0


def warmup_steps_of(cfg: TrainConfig, total_steps: int) -> int:
    """`warmup_steps`, or `warmup_ratio` of the run's steps rounded up (as Hugging Face rounds it)."""
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The rate of step `step` (0-based): linear warm-up to `lr` over the warm-up steps (step s gets
    lr * (s + 1) / warm-up, never 0), then constant, or cosine or linear decay to the floor
    reached at `total_steps`."""
    kind, floor = schedule_of(cfg)
    warmup = warmup_steps_of(cfg, total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if kind == "constant":
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if kind == "linear":
        return floor + (1.0 - progress) * (cfg.lr - floor)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - floor)
