"""What a training run is told (`TrainConfig`) and where it is (`TrainState`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class TrainConfig:
    """Everything a run needs besides the model shape; defaults reproduce the tutorial's chapter 5."""

    data: str = "the-verdict"
    data_dir: str | None = None
    text_column: str | None = None
    val_ratio: float = 0.1
    stride: int | None = None  # None: the context length (non-overlapping windows)
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr: float | None = None  # None: lr, i.e. a constant rate after warm-up
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float | None = None
    max_bad_steps: int = 1  # consecutive steps with a non-finite loss or gradients before the run stops
    eval_interval: int = 5
    eval_iters: int = 5
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 123
    out_dir: str | None = None
    save_interval: int | None = None
    keep_last: int = 3
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 50
    report_to: str = "none"
    progress: bool = True
    compile: bool = False

    @classmethod
    def from_flags(cls, flags: dict) -> TrainConfig:
        """The config of a command's parsed flags (those that are not fields are ignored)."""
        return cls(**{k: v for k, v in flags.items() if k in cls.__dataclass_fields__})

    def check(self) -> None:
        """Refuse optimisation values no run can use, naming the flag."""
        for flag, value in (("lr", self.lr), ("min-lr", self.min_lr), ("grad-clip", self.grad_clip),
                            ("weight-decay", self.weight_decay)):
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"--{flag} must be a finite number, got {value}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"--grad-clip must be positive (the largest gradient norm kept), got {self.grad_clip}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"--max-bad-steps must be positive, got {self.max_bad_steps}")
        if self.eval_interval < 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("--eval-interval, --warmup-steps and --weight-decay must not be negative")


@dataclass
class TrainState:
    """Where a run is: everything besides model and optimizer that a resume needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    sample_in_epoch: int = 0  # windows of `epoch` already consumed, over all ranks
    tokens_seen: int = 0
    # one entry per evaluation: step, epoch, tokens_seen and train_/val_ metrics
    history: dict[str, list] = field(default_factory=dict)

    def record(self, point: dict[str, float]) -> None:
        """Append an evaluation's values to the history."""
        for key, value in point.items():
            self.history.setdefault(key, []).append(value)
