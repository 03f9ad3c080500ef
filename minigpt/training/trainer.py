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
import traceback
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
from .steps import PendingSteps, StepGuard, step_on_device
from .tasks import Task


class Trainer:
    """One run. `model`: the plain model (evaluation, sampling, checkpoints); `wrapped`: what steps call.
    `val_set` None trains without validation (the metrics and plot then have training losses only)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_set, val_set, task: Task,
                 out_dir: Path | None = None, args: dict[str, Any] | None = None, dist_info: DistInfo | None = None,
                 device: torch.device | None = None, fsdp: bool = False) -> None:
        # `out_dir` defaults to `cfg.out_dir` or runs/<data name>; `args` is what checkpoints record as the flags.
        out_dir = Path(out_dir or cfg.out_dir or Path("runs") / Path(cfg.data).stem)
        self.cfg, self.task, self.out_dir, self.args, self.fsdp = cfg, task, out_dir, dict(args or {}), fsdp
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
        self.optimizer = configure_optimizer(self.model, cfg.lr, cfg.weight_decay, self.device, fused=not fsdp,
                                             betas=cfg.adam_betas, decay_embeddings=cfg.decay_embeddings)
        self.total_steps = cfg.max_steps or cfg.epochs * self.sampler.steps_per_epoch
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", cfg.report_to, enabled=self.dist.is_main)
        self.metrics_file = self.metrics.path
        self.stop_requested = self.stopping = False  # asked on this rank; agreed by all ranks
        self.guard = StepGuard(cfg.max_bad_steps, 0)
        self.pending = PendingSteps()

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.log(record)

    def echo(self, text: str) -> None:
        if self.dist.is_main:
            tqdm.write(text)

    def train_step(self) -> None:
        """One optimizer step over `grad_accum` micro-batches; its loss stays on the device (`pending`)."""
        lr = lr_at(self.state.step, self.cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = None
        for k in range(self.cfg.grad_accum):
            batch = self.sampler.next_batch(self.state)
            with gradient_sync(self.wrapped, self.dist, self.fsdp, k == self.cfg.grad_accum - 1):
                with self.precision.autocast():
                    loss = self.task.loss(self.wrapped, batch, self.device) / self.cfg.grad_accum
                self.precision.backward(loss)
            part = loss.detach().to(torch.float64)  # summed as the host would sum the floats
            total = part if total is None else total + part
            self.state.tokens_seen += batch[0].numel() * self.dist.world_size
        numbers = step_on_device(self.optimizer, self.precision, list(self.model.parameters()), total,
                                 self.dist.world_size, self.cfg.grad_clip)
        self.pending.add(self.state.step, lr, numbers)
        self.state.step += 1

    def read_steps(self) -> float | None:
        """Read and judge the pending steps (`StepGuard`), log their mean loss and agree on stopping;
        a collective: every rank calls it at the same steps. Returns the mean loss, if any step pended."""
        read, judged = self.pending.read(), []
        try:
            for step, loss, grads_finite, _ in read:
                self.guard.judge(loss, grads_finite, step, self.echo)
                judged.append(loss)
        finally:
            if judged:
                step, _, _, lr = read[len(judged) - 1]
                self.log({"event": "step", "step": step + 1, "loss": sum(judged) / len(judged), "lr": lr})
        stops = all_reduce_sum([float(self.stop_requested)], self.device)[0] if self.dist.enabled else \
            self.stop_requested
        self.stopping = bool(stops)
        return sum(judged) / len(judged) if judged else None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics on both splits (or the training one alone), logged, printed and kept."""
        self.model.eval()
        splits = [("train", self.train_set)] + ([("val", self.val_set)] if self.val_set is not None else [])
        with self.precision.autocast():
            metrics = {f"{split}_{key}": value for split, dataset in splits
                       for key, value in global_batch_means(
                           self.task, self.model, self.sampler.eval_batches(dataset, self.eval_iters()),
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

    def eval_iters(self) -> int:
        """Batches per split and evaluation; `eval_iters` None: all of the validation split (or of
        the training split, without validation)."""
        whole = self.val_set if self.val_set is not None else self.train_set
        return self.cfg.eval_iters or math.ceil(len(whole) / self.sampler.global_batch)

    def end_of_epoch(self) -> None:
        """The task's sample, logged and printed; a sample that fails is reported and training goes on."""
        # Under FSDP every rank takes part in each forward pass; otherwise rank 0 alone samples.
        if not (self.fsdp or self.dist.is_main):
            return
        try:
            text = self.task.end_of_epoch(self.model, self.device)
        except Exception as e:  # a sample is a by-product: it never costs the run
            self.model.train()
            print(f"warning: the sample at step {self.state.step} failed ({type(e).__name__}: {e}); training goes "
                  f"on\n{traceback.format_exc()}", file=sys.stderr)
            return
        if text is not None:
            self.log({"event": "sample", "step": self.state.step, "epoch": self.state.epoch + 1, "text": text})
            self.echo(text)

    def save(self) -> Path:
        """Checkpoint the state at the last completed step (a collective: every rank calls it);
        weights that are not all finite are never saved."""
        if len(self.pending):  # the guard must have judged every step before a checkpoint is named
            self.read_steps()
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
        return run_fit(self)


def run_fit(trainer: Trainer) -> dict[str, Any]:
    """`Trainer.fit`: the steps, then the final checkpoint (first: nothing after it can cost it),
    the epoch's sample and the final evaluation."""
    state, history = trainer.state, trainer.state.history
    trainer.wrapped.train()
    progress = Progress(trainer.total_steps, state.step, state.tokens_seen,
                        trainer.cfg.progress and trainer.dist.is_main)
    t0, tokens0, last_ckpt = time.perf_counter(), state.tokens_seen, None
    try:
        with StopOnInterrupt(trainer):
            while state.step < trainer.total_steps:
                last_ckpt = advance(trainer, progress) or last_ckpt
    except NonFiniteLoss as e:
        raise with_last_checkpoint(e, trainer.out_dir, trainer.guard.good_step, trainer.dist.is_main) from None
    finally:
        progress.close()
    elapsed = time.perf_counter() - t0
    if last_ckpt is None or last_ckpt.name != f"step-{state.step:06d}":
        last_ckpt = trainer.save()
    if not trainer.sampler.epoch_done(state):
        trainer.end_of_epoch()
    if not history.get("step") or history["step"][-1] != state.step:
        trainer.evaluate()
    if trainer.dist.is_main:
        prune_if_proven(trainer.out_dir, history, trainer.cfg.keep_last)
    return {"final": {k: v[-1] for k, v in history.items()},
            "tokens_per_s": (state.tokens_seen - tokens0) / max(elapsed, 1e-9),
            "checkpoint": last_ckpt, "metrics": trainer.metrics_file,
            "plot": trainer.task.plot(history, trainer.out_dir) if trainer.dist.is_main else None,
            "steps": state.step, "seconds": elapsed}


def advance(trainer: Trainer, progress: Progress) -> Path | None:
    """One step and what follows it: the losses read (every `log_interval` steps and wherever they
    are needed), evaluation, checkpoint, the epoch's sample, stop on request."""
    cfg, state = trainer.cfg, trainer.state
    trainer.train_step()
    step = state.step
    eval_due = cfg.eval_interval and (step - 1) % cfg.eval_interval == 0
    save_due = cfg.save_interval and step % cfg.save_interval == 0
    # A lone process stops at the next step; ranks agree on stopping where they read the losses.
    if (step % cfg.log_interval == 0 or eval_due or save_due or step >= trainer.total_steps
            or (trainer.stop_requested and not trainer.dist.enabled)):
        progress.show(trainer.read_steps(), trainer.optimizer.param_groups[0]["lr"])
    if eval_due:
        trainer.evaluate()
    saved = trainer.save() if save_due else None
    if trainer.sampler.epoch_done(state):
        trainer.end_of_epoch()
    progress.update(state.tokens_seen)
    if trainer.stopping:
        save_and_stop(trainer, progress)
    return saved


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
