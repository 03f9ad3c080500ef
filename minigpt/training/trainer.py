"""The training loop: `Trainer.fit` runs `train_step`s, evaluates, samples and checkpoints.

In a torchrun job every rank builds one Trainer; each reads its own part of every global
batch, and only rank 0 prints, logs and writes checkpoints.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..device import resolve_device
from ..distributed import (DistInfo, all_reduce_sum, barrier, full_state, gather_objects, gradient_sync,
                           load_full_optimizer_state, wrap_model)
from ..errors import NonFiniteLoss
from .checkpoints import (checkpoint_dir, last_good_checkpoint, prune_checkpoints, restore_rng, save_checkpoint,
                          trainer_payload)
from .config import TrainConfig, TrainState
from .metrics import MetricsLog, Progress, keep_metrics_until
from .optim import configure_optimizer, lr_at
from .precision import Precision
from .sampler import EpochSampler
from .tasks import Task


class Trainer:
    """One run. `model`: the plain model (evaluation, sampling, checkpoints); `wrapped`: what steps call."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_set, val_set, task: Task, out_dir: Path,
                 args: dict[str, Any], dist_info: DistInfo | None = None, device: torch.device | None = None,
                 fsdp: bool = False) -> None:
        self.cfg, self.task, self.out_dir, self.args, self.fsdp = cfg, task, Path(out_dir), args, fsdp
        self.dist = dist_info or DistInfo()
        self.device = device or resolve_device(cfg.device)
        self.precision = Precision(cfg.dtype, self.device)
        self.model = model.to(self.device)  # sharded in place under FSDP
        self.wrapped = wrap_model(self.model, self.dist, self.device, fsdp)  # DDP, FSDP or the model itself
        if cfg.compile:  # compiled lazily at the first step
            self.wrapped = torch.compile(self.wrapped)
        self.train_set, self.val_set = train_set, val_set
        self.sampler = EpochSampler(train_set, cfg.batch_size, cfg.grad_accum, cfg.seed, self.dist)
        self.state = TrainState()
        self.optimizer = configure_optimizer(self.model, cfg.lr, cfg.weight_decay, self.device, fused=not fsdp)
        self.total_steps = cfg.max_steps or cfg.epochs * self.sampler.steps_per_epoch
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", cfg.report_to, enabled=self.dist.is_main)
        self.metrics_file = self.metrics.path
        self.stop_requested = False
        self.guard = StepGuard(cfg.max_bad_steps, 0)

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.log(record)

    def echo(self, text: str) -> None:
        if self.dist.is_main:
            tqdm.write(text)

    def train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss over ranks."""
        lr = lr_at(self.state.step, self.cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for k in range(self.cfg.grad_accum):
            batch = self.sampler.next_batch(self.state)
            with gradient_sync(self.wrapped, self.dist, self.fsdp, k == self.cfg.grad_accum - 1):
                with self.precision.autocast():
                    loss = self.task.loss(self.wrapped, batch, self.device) / self.cfg.grad_accum
                self.precision.backward(loss)
            total += loss.item()
            self.state.tokens_seen += batch[0].numel() * self.dist.world_size
        return conclude_step(self, total)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics on both splits, logged, printed and kept in the history."""
        self.model.eval()
        with self.precision.autocast():
            metrics = {f"{split}_{key}": value
                       for split, dataset in (("train", self.train_set), ("val", self.val_set))
                       for key, value in global_batch_means(
                           self.task, self.model, self.sampler.eval_batches(dataset, self.cfg.eval_iters),
                           self.device).items()}
        self.model.train()
        s = self.state
        s.record({"step": s.step, "epoch": self.sampler.epoch_progress(s), "tokens_seen": s.tokens_seen, **metrics})
        self.log({"event": "eval", "step": s.step, "epoch": s.epoch + 1, "tokens_seen": s.tokens_seen, **metrics})
        # Numbered as the tutorial prints it: the index of the step just taken.
        # The losses first, as the tutorial prints them ("Train loss 9.558, Val loss 9.856"), then the rest.
        order = sorted(metrics, key=lambda k: (not k.endswith("_loss"), k))
        shown = ", ".join(f"{k.replace('_', ' ', 1).capitalize()} {metrics[k]:.3f}" for k in order)
        self.echo(f"Ep {s.epoch + 1} (Step {s.step - 1:06d}): {shown}")
        return metrics

    def end_of_epoch(self) -> None:
        # Under FSDP every rank takes part in each forward pass; otherwise rank 0 alone samples.
        if not (self.fsdp or self.dist.is_main):
            return
        text = self.task.end_of_epoch(self.model, self.device)
        if text is not None:
            self.log({"event": "sample", "step": self.state.step, "epoch": self.state.epoch + 1, "text": text})
            self.echo(text)

    def save(self) -> Path:
        """Checkpoint the state at the last completed step (a collective: every rank calls it);
        weights that are not all finite are never saved."""
        model_state, optimizer_state = full_state(self.wrapped, self.optimizer)
        rng = gather_objects(torch.get_rng_state())
        refuse_non_finite(model_state, self.dist, self.device, self.state.step)
        if self.dist.is_main:
            trainer = trainer_payload(self.state, optimizer_state, self.precision.scaler, rng, self.dist.world_size)
            save_checkpoint(self.model, self.out_dir, self.state.step, model_state, trainer, self.args,
                            self.cfg.keep_last, self.guard.good_step)
        barrier()
        return checkpoint_dir(self.out_dir, self.state.step)

    def restore(self, trainer_state: dict[str, Any]) -> None:
        """Continue exactly where a checkpoint's run stopped (see `EpochSampler`, `restore_rng`)."""
        self.state = TrainState(**trainer_state["state"])
        self.sampler.check_position(self.state)
        load_full_optimizer_state(self.wrapped, self.optimizer, trainer_state["optimizer"], self.fsdp)
        self.precision.scaler.load_state_dict(trainer_state["scaler"])
        restore_rng(trainer_state, self.dist, self.cfg.seed, self.state.step)
        self.guard = StepGuard(self.cfg.max_bad_steps, self.state.step)
        if self.dist.is_main:
            keep_metrics_until(self.metrics_file, self.state.step)

    def fit(self) -> dict[str, Any]:
        """Train to `total_steps`; returns the final metrics and where the outputs are."""
        state, history = self.state, self.state.history
        self.wrapped.train()
        progress = Progress(self.total_steps, state.step, state.tokens_seen, self.cfg.progress and self.dist.is_main)
        t0, tokens0, last_ckpt = time.perf_counter(), state.tokens_seen, None
        try:
            with StopOnInterrupt(self):
                while state.step < self.total_steps:
                    last_ckpt = self._advance(progress) or last_ckpt
        except NonFiniteLoss as e:
            raise with_last_checkpoint(e, self.out_dir, self.guard.good_step, self.dist.is_main) from None
        finally:
            progress.close()
        elapsed = time.perf_counter() - t0
        if not self.sampler.epoch_done(state):
            self.end_of_epoch()
        if last_ckpt is None or last_ckpt.name != f"step-{state.step:06d}":
            last_ckpt = self.save()
        if not history.get("step") or history["step"][-1] != state.step:
            self.evaluate()
        if self.dist.is_main:
            prune_if_proven(self.out_dir, history, self.cfg.keep_last)
        return {"final": {k: v[-1] for k, v in history.items()},
                "tokens_per_s": (state.tokens_seen - tokens0) / max(elapsed, 1e-9),
                "checkpoint": last_ckpt, "metrics": self.metrics_file,
                "plot": self.task.plot(history, self.out_dir) if self.dist.is_main else None,
                "steps": state.step, "seconds": elapsed}

    def _advance(self, progress: Progress) -> Path | None:
        """One step and what follows it: log, evaluation, epoch's sample, checkpoint, stop on request."""
        cfg, state = self.cfg, self.state
        loss = self.train_step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.log({"event": "step", "step": state.step, "loss": loss, "lr": lr})
        if cfg.eval_interval and (state.step - 1) % cfg.eval_interval == 0:
            self.evaluate()
        if self.sampler.epoch_done(state):
            self.end_of_epoch()
        saved = self.save() if cfg.save_interval and state.step % cfg.save_interval == 0 else None
        progress.update(loss, lr, state.tokens_seen)
        if self.stop_requested:
            save_and_stop(self, progress)
        return saved


def conclude_step(trainer: Trainer, total: float) -> float:
    """Apply the accumulated gradients unless the loss or a gradient is non-finite (`StepGuard`);
    returns the mean loss over ranks."""
    params = list(trainer.model.parameters())
    norm = trainer.precision.grad_norm(params)
    grads_ok = norm is None or bool(torch.isfinite(norm))
    # One all-reduce: the mean loss (so every rank sees a NaN and stops together), any rank's
    # non-finite gradients and any stop request.
    loss_sum, bad_grads, stops = all_reduce_sum([total, float(not grads_ok), float(trainer.stop_requested)],
                                                trainer.device)
    total, trainer.stop_requested = loss_sum / trainer.dist.world_size, stops > 0
    if trainer.guard.judge(total, bad_grads == 0, trainer.state.step, trainer.echo):
        trainer.precision.step(trainer.optimizer, params, trainer.cfg.grad_clip, norm)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.state.step += 1
    return total


def save_and_stop(trainer: Trainer, progress: Progress) -> None:
    """Ctrl-C was pressed: checkpoint, say how to continue, and raise `KeyboardInterrupt`."""
    progress.close()
    path = trainer.save()
    if trainer.dist.is_main:
        print(f"interrupted at step {trainer.state.step}: checkpoint saved to {path}; "
              f"continue with --resume {path}", file=sys.stderr)
    raise KeyboardInterrupt


def prune_if_proven(out_dir: Path, history: dict[str, list], keep_last: int) -> None:
    """The final weights evaluated to finite losses: a checkpoint kept until they did may go."""
    if all(math.isfinite(v[-1]) for k, v in history.items() if k.endswith("_loss")):
        prune_checkpoints(out_dir, keep_last, history["step"][-1])


def refuse_non_finite(model_state: dict[str, torch.Tensor], dist_info: DistInfo, device: torch.device,
                      step: int) -> None:
    """`NonFiniteLoss` on every rank if the first rank's weights to save are not all finite."""
    finite = not dist_info.is_main or all(bool(torch.isfinite(t).all()) for t in model_state.values())
    if all_reduce_sum([float(not finite)], device)[0]:
        raise NonFiniteLoss(f"the weights became non-finite at step {step}; they were not saved")


def with_last_checkpoint(error: NonFiniteLoss, out_dir: Path, good_step: int, is_main: bool) -> NonFiniteLoss:
    """`error`, telling which checkpoint is the last good one (the first rank also renames the
    newer ones, whose weights gave the non-finite loss, `step-N.nonfinite`)."""
    good = last_good_checkpoint(out_dir, good_step, rename=is_main)
    where = f"the last good checkpoint is {good}" if good else "no good checkpoint was written"
    return NonFiniteLoss(f"{error}: stopping; {where} (try a lower --lr or --grad-clip)")


class StepGuard:
    """Which weights are known to give a finite loss, and how many bad steps came in a row."""

    def __init__(self, max_bad_steps: int, step: int) -> None:
        self.max_bad_steps, self.in_a_row = max_bad_steps, 0
        self.good_step = step - 1  # the weights of every earlier step gave a finite loss

    def judge(self, loss: float, grads_finite: bool, step: int, echo) -> bool:
        """Whether to apply step `step`'s update: not when its loss or gradients are non-finite;
        `NonFiniteLoss` at the `max_bad_steps`-th such step in a row."""
        if math.isfinite(loss) and grads_finite:
            self.in_a_row, self.good_step = 0, step
            return True
        if math.isfinite(loss):
            self.good_step = step + 1  # the weights stay those that just gave a finite loss
        self.in_a_row += 1
        what = f"loss became {loss}" if not math.isfinite(loss) else "the gradients became non-finite"
        if self.in_a_row >= self.max_bad_steps:
            row = f" ({self.in_a_row} bad steps in a row)" if self.in_a_row > 1 else ""
            raise NonFiniteLoss(f"{what} at step {step}{row}")
        echo(f"step {step}: {what}; update skipped ({self.in_a_row} of --max-bad-steps {self.max_bad_steps})")
        return False


def global_batch_means(task: Task, model: nn.Module, batches, device: torch.device) -> dict[str, float]:
    """The mean over global batches of each of the task's metrics, whatever the number of ranks:
    each rank's (metric x windows) are summed over ranks, then divided by the batch's windows."""
    rows, keys = [], []
    for batch, weight in batches:
        values = task.evaluate(model, [batch], device)
        keys = sorted(values)
        rows.append([weight * values[k] if weight else 0.0 for k in keys] + [weight])
    totals = all_reduce_sum([x for row in rows for x in row], device)
    width = len(keys) + 1
    per_batch = [totals[i:i + width] for i in range(0, len(totals), width)]
    means = {}
    for j, key in enumerate(keys):
        values = [row[j] / row[-1] for row in per_batch]
        means[key] = sum(values) / len(values) if values else float("nan")
    return means


class StopOnInterrupt:
    """While active (in the main thread), the first Ctrl-C asks the trainer to stop at the next
    step boundary, where the state is consistent; a second one interrupts at once."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.previous = trainer, None

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _on_sigint(self, signum, frame) -> None:
        self.trainer.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.trainer.echo("Ctrl-C: saving a checkpoint after this step (press again to abort)")
