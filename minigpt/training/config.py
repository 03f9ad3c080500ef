"""What a training run is told (`TrainConfig`) and where it is (`TrainState`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError

LR_SCHEDULES = ("constant", "cosine", "linear")


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
    # None: cosine to `min_lr` if it is set, else constant (the chapter-5 run), as before schedules had names
    lr_schedule: str | None = None
    min_lr: float | None = None  # the floor; None: 10% of lr for cosine, 0 for linear
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # warm-up as a fraction of the run's steps (rounded up), instead of warmup_steps
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.999)
    decay_embeddings: bool = False  # weight decay on the embedding tables too (nanoGPT's and HF's habit)
    grad_clip: float | None = None
    max_bad_steps: int = 1  # consecutive steps with a non-finite loss or gradients before the run stops
    eval_interval: int = 5
    eval_iters: int | None = 5  # None: every validation batch (and as many training batches)
    log_interval: int = 1  # steps per logged loss: the host reads the device's losses this often
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
        self.check_schedule()
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"--grad-clip must be positive (the largest gradient norm kept), got {self.grad_clip}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"--max-bad-steps must be positive, got {self.max_bad_steps}")
        if self.eval_interval < 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("--eval-interval, --warmup-steps and --weight-decay must not be negative")
        if self.log_interval < 1:
            raise ConfigError(f"--log-interval must be positive, got {self.log_interval}")

    def check_schedule(self) -> None:
        """Refuse a schedule, warm-up or Adam betas no run can use, and a flag the schedule would ignore."""
        if self.lr_schedule not in (None, *LR_SCHEDULES):
            raise ConfigError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.lr_schedule == "constant" and self.min_lr is not None:
            raise ConfigError(f"--min-lr {self.min_lr} has no effect with --lr-schedule constant; "
                              "drop it or pick cosine or linear")
        if not (math.isfinite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and self.warmup_steps:
            raise ConfigError(f"give --warmup-steps ({self.warmup_steps}) or --warmup-ratio ({self.warmup_ratio}), "
                              "not both")
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"--adam-betas must be two numbers in [0, 1), got {list(betas)}")


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
