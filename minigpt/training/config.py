"""What a training run is told (`TrainConfig`) and where it is (`TrainState`)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
