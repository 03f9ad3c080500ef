"""Training: the tutorial's simple loop, and the full trainer behind `python -m minigpt.train`."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as data_lib
from .checkpoint import CheckpointError, load_model, load_trainer_state, read_config, save_model
from .config import GPTConfig, get_preset
from .device import DTYPES, cpu_has_bf16_arithmetic, keep_freed_memory, resolve_device, to_device, use_fast_matmul
from .distributed import (DistInfo, all_reduce_sum, barrier, full_state, gather_objects, init_distributed,
                          load_full_optimizer_state, shutdown, wrap_model)
from .generate import generate_text_simple
from .loss import calc_loss_batch, calc_loss_loader, perplexity
from .model import GPTModel
from .plot import plot_losses
from .tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

# ----------------------------------------------------------------------------------------------
# The tutorial's loop, kept as it is so that the book's code runs unchanged against minigpt.


def train_model_simple(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer,
                       device: torch.device | str, num_epochs: int, eval_freq: int, eval_iter: int,
                       start_context: str, tokenizer=None) -> tuple[list[float], list[float], list[int]]:
    """Train for `num_epochs`, evaluating every `eval_freq` steps; returns (train losses,
    val losses, tokens seen) at each evaluation. Prints a sample after each epoch."""
    tokenizer = tokenizer if tokenizer is not None else train_loader.dataset.tokenizer
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch + 1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


def evaluate_model(model: nn.Module, train_loader, val_loader, device: torch.device | str,
                   eval_iter: int) -> tuple[float, float]:
    """Mean loss over the first `eval_iter` batches of each loader, in eval mode."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def sample_text(model: GPTModel, tokenizer, device: torch.device | str, start_context: str,
                max_new_tokens: int = 50) -> str:
    """Greedy continuation of `start_context`, on one line."""
    was_training = model.training
    model.eval()
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(model, encoded, max_new_tokens, model.pos_emb.weight.shape[0])
    model.train(was_training)
    return token_ids_to_text(token_ids, tokenizer).replace("\n", " ")


def generate_and_print_sample(model: GPTModel, tokenizer, device: torch.device | str, start_context: str) -> None:
    print(sample_text(model, tokenizer, device, start_context))


# ----------------------------------------------------------------------------------------------
# The full trainer.


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
    # The fused kernel does the whole update in one pass: several times faster on CPU and CUDA.
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


def batch_order(n_windows: int, epoch: int, seed: int) -> torch.Tensor:
    """The shuffled window order of an epoch: a pure function of (seed, epoch), so a resumed
    run sees the same batches without replaying the data."""
    return torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def stack_examples(dataset, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """A batch: the dataset's examples (tuples of tensors) at `indices`, stacked field by field."""
    return tuple(torch.stack(field) for field in zip(*(dataset[int(i)] for i in indices), strict=True))


class LanguageModelTask:
    """What the trainer does with a batch when pretraining: next-token prediction on
    (inputs, targets) windows. Other tasks (e.g. classification) provide the same methods."""

    def __init__(self, tokenizer, sample_prompt: str, sample_tokens: int = 50) -> None:
        self.tokenizer, self.sample_prompt, self.sample_tokens = tokenizer, sample_prompt, sample_tokens

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        # The model's own loss: `calc_loss_batch`'s value without the (tokens, vocab) logits.
        return model(to_device(batch[0], device), targets=to_device(batch[1], device))

    def evaluate(self, model: nn.Module, batches, device: torch.device) -> dict[str, float]:
        """Metrics over `batches` (in eval mode, without gradients): the mean batch loss."""
        losses = [self.loss(model, batch, device).item() for batch in batches]
        return {"loss": sum(losses) / len(losses) if losses else float("nan")}

    def end_of_epoch(self, model: GPTModel, device: torch.device) -> str:
        """A line to print after each epoch: a greedy sample from the fixed prompt."""
        return sample_text(model, self.tokenizer, device, self.sample_prompt, self.sample_tokens)

    def plot(self, history: dict[str, list], out_dir: Path) -> Path:
        return plot_losses(history["epoch"], history["tokens_seen"], history["train_loss"], history["val_loss"],
                           out_dir / "loss-plot.png")


@dataclass
class TrainState:
    """Where a run is: everything besides model and optimizer that a resume needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    sample_in_epoch: int = 0  # windows of `epoch` already consumed, over all ranks
    tokens_seen: int = 0
    # one entry per evaluation: step, epoch, tokens_seen and train_/val_ metrics
    history: dict[str, list] = field(default_factory=dict)


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    """Owns the model, optimizer, data and run directory of one training run.

    In a torchrun job every rank builds one; each reads its own part of every global batch,
    and only rank 0 prints, logs and writes checkpoints.
    """

    def __init__(self, model: GPTModel, cfg: TrainConfig, train_set, val_set, task, out_dir: Path,
                 args: dict[str, Any], dist_info: DistInfo | None = None, device: torch.device | None = None,
                 fsdp: bool = False) -> None:
        self.cfg, self.task, self.out_dir, self.args = cfg, task, out_dir, args
        self.dist = dist_info or DistInfo()
        self.device = device or resolve_device(cfg.device)
        use_fast_matmul(self.device)
        self.fsdp = fsdp
        self.module = model.to(self.device)  # the GPTModel (sharded in place under FSDP)
        self.model = wrap_model(self.module, self.dist, self.device, fsdp)  # what training calls
        if cfg.compile:
            # Compiled lazily at the first step; evaluation and sampling use the plain module.
            self.model = torch.compile(self.model)
        self.train_set, self.val_set = train_set, val_set
        self.state = TrainState()
        self.optimizer = configure_optimizer(self.module, cfg.lr, cfg.weight_decay, self.device, fused=not fsdp)
        self.amp_dtype = DTYPES[cfg.dtype]
        if self.amp_dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError("--dtype float16 needs CUDA (its gradient scaler); use bfloat16 on the CPU")
        if self.amp_dtype == torch.bfloat16 and self.device.type == "cpu" and not cpu_has_bf16_arithmetic():
            warnings.warn("this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX): bfloat16 autocast "
                          "multiplies in float32 here (minigpt.kernels), so it saves memory but no time; "
                          "--dtype float32 is as fast and more exact", stacklevel=2)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.global_batch = cfg.batch_size * self.dist.world_size
        self.batches_per_epoch = len(train_set) // self.global_batch
        if self.batches_per_epoch < cfg.grad_accum:
            raise ValueError(
                f"the training split has {len(train_set)} windows: not enough for one step of batch_size "
                f"{cfg.batch_size} x grad_accum {cfg.grad_accum} x {self.dist.world_size} process(es); "
                "lower them or add data")
        self.steps_per_epoch = self.batches_per_epoch // cfg.grad_accum
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.metrics_file = out_dir / "metrics.jsonl"
        self.reporter = make_reporter(cfg.report_to, out_dir) if self.dist.is_main else (lambda record: None)
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)
        self._stop_requested = False

    # -- pieces ----------------------------------------------------------------------------

    def autocast(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def gradient_sync(self, enabled: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(enabled)
        elif self.dist.enabled and not enabled:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def echo(self, text: str) -> None:
        if self.dist.is_main:
            tqdm.write(text)

    @property
    def epoch_done(self) -> bool:
        return self.state.sample_in_epoch >= self.steps_per_epoch * self.cfg.grad_accum * self.global_batch

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """This rank's part of the next global micro-batch; the data position advances with it."""
        if self.epoch_done:
            self.state.epoch += 1
            self.state.sample_in_epoch = 0
        if self._order_epoch != self.state.epoch:
            self._order = batch_order(len(self.train_set), self.state.epoch, self.cfg.seed)
            self._order_epoch = self.state.epoch
        start = self.state.sample_in_epoch + self.dist.rank * self.cfg.batch_size
        self.state.sample_in_epoch += self.global_batch
        return stack_examples(self.train_set, self._order[start:start + self.cfg.batch_size])

    def end_of_epoch(self) -> None:
        # Under FSDP every rank takes part in each forward pass; otherwise rank 0 alone samples.
        if not (self.fsdp or self.dist.is_main):
            return
        text = self.task.end_of_epoch(self.module, self.device)
        if text is not None:
            self.log({"event": "sample", "step": self.state.step, "epoch": self.state.epoch + 1, "text": text})
            self.echo(text)

    def eval_batches(self, dataset) -> Iterator[tuple[tuple[torch.Tensor, ...], int]]:
        """This rank's part of each of the first `eval_iters` global batches of `dataset` (in its
        natural order), with the number of windows it holds. A rank whose part of a short last
        batch is empty runs window 0 with weight 0: every rank runs every batch (FSDP needs that)."""
        bs, gb = self.cfg.batch_size, self.global_batch
        for i in range(min(self.cfg.eval_iters, math.ceil(len(dataset) / gb))):
            start = i * gb + self.dist.rank * bs
            stop = min(start + bs, (i + 1) * gb, len(dataset))
            yield (stack_examples(dataset, range(start, stop)), stop - start) if stop > start else \
                (stack_examples(dataset, [0]), 0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics on both splits: the mean over batches of each global batch's metric,
        the same whatever the number of ranks. Logged, printed and kept in the history."""
        self.module.eval()
        metrics = {}
        with self.autocast():
            for split, dataset in (("train", self.train_set), ("val", self.val_set)):
                rows, keys = [], []
                for batch, weight in self.eval_batches(dataset):
                    values = self.task.evaluate(self.module, [batch], self.device)
                    keys = sorted(values)
                    rows.append([weight * values[k] if weight else 0.0 for k in keys] + [weight])
                totals = all_reduce_sum([x for row in rows for x in row], self.device)
                width = len(keys) + 1
                per_batch = [totals[i:i + width] for i in range(0, len(totals), width)]
                for j, key in enumerate(keys):
                    values = [row[j] / row[-1] for row in per_batch]
                    metrics[f"{split}_{key}"] = sum(values) / len(values) if values else float("nan")
        self.module.train()
        s = self.state
        point = {"step": s.step, "epoch": s.epoch + s.sample_in_epoch / (self.batches_per_epoch * self.global_batch),
                 "tokens_seen": s.tokens_seen, **metrics}
        for key, value in point.items():
            s.history.setdefault(key, []).append(value)
        self.log({"event": "eval", "step": s.step, "epoch": s.epoch + 1, "tokens_seen": s.tokens_seen, **metrics})
        # Numbered as the tutorial prints it: the index of the step just taken.
        shown = ", ".join(f"{k.replace('_', ' ', 1).capitalize()} {v:.3f}" for k, v in metrics.items())
        self.echo(f"Ep {s.epoch + 1} (Step {s.step - 1:06d}): {shown}")
        return metrics

    def log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.reporter(record)

    def train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss over ranks."""
        lr = lr_at(self.state.step, self.cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for k in range(self.cfg.grad_accum):
            batch = self.next_batch()
            with self.gradient_sync(k == self.cfg.grad_accum - 1):
                with self.autocast():
                    loss = self.task.loss(self.model, batch, self.device) / self.cfg.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.item()
            self.state.tokens_seen += batch[0].numel() * self.dist.world_size
        # One small all-reduce: the mean loss for the log and the NaN check (so every rank
        # stops together), and whether any rank was asked to stop.
        loss_sum, stops = all_reduce_sum([total, float(self._stop_requested)], self.device)
        total, self._stop_requested = loss_sum / self.dist.world_size, stops > 0
        if not math.isfinite(total):
            raise NonFiniteLoss(f"loss became {total} at step {self.state.step}")
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return total

    # -- checkpoints -----------------------------------------------------------------------

    def save(self) -> Path:
        """Write a checkpoint of the state at the last completed step; keep the newest `keep_last`."""
        ckpt_dir = self.out_dir / "checkpoints" / f"step-{self.state.step:06d}"
        model_state, optimizer_state = full_state(self.model, self.optimizer, self.fsdp)
        rng = gather_objects(torch.get_rng_state())
        if self.dist.is_main:
            trainer = {
                "state": asdict(self.state),
                "optimizer": optimizer_state,
                "scaler": self.scaler.state_dict(),
                "rng": rng,  # one per rank
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "world_size": self.dist.world_size,
                "args": self.args,
            }
            save_model(self.module, ckpt_dir, metadata={"step": self.state.step, "train_args": self.args},
                       extra_files={"trainer.pt": trainer}, state=model_state)
            for old in list_checkpoints(self.out_dir)[:-self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return ckpt_dir

    def restore(self, trainer_state: dict[str, Any]) -> None:
        """Continue exactly where a checkpoint's run stopped.

        The data position is kept in windows, so another world size continues from the same
        place when the position is a whole number of its global batches; dropout streams are
        only exact with the same world size (each rank has its own)."""
        self.state = TrainState(**trainer_state["state"])
        if self.state.sample_in_epoch % self.global_batch:
            raise ValueError(
                f"the checkpoint stopped {self.state.sample_in_epoch} windows into epoch {self.state.epoch + 1}, "
                f"not a multiple of this run's global batch ({self.global_batch}); resume with a batch size and "
                "world size whose product divides it")
        load_full_optimizer_state(self.model, self.optimizer, trainer_state["optimizer"], self.fsdp)
        self.scaler.load_state_dict(trainer_state["scaler"])
        rngs = trainer_state["rng"]
        if trainer_state.get("world_size", 1) == self.dist.world_size:
            torch.set_rng_state(rngs[self.dist.rank])
        else:
            torch.manual_seed(self.cfg.seed + 7919 * self.state.step + self.dist.rank)
        if trainer_state["cuda_rng"] and torch.cuda.is_available() and not self.dist.enabled:
            torch.cuda.set_rng_state_all(trainer_state["cuda_rng"])
        if self.dist.is_main:
            keep_metrics_until(self.metrics_file, self.state.step)

    def _on_sigint(self, signum, frame) -> None:
        # The first Ctrl-C stops at the next step boundary, where the state is consistent;
        # a second one interrupts at once.
        self._stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.echo("Ctrl-C: saving a checkpoint after this step (press again to abort)")

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg, state, h = self.cfg, self.state, self.state.history
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=state.step, disable=not (cfg.progress and self.dist.is_main),
                   unit="step", dynamic_ncols=True)
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint) if in_main_thread else None
        t0, tokens0, last_ckpt = time.perf_counter(), state.tokens_seen, None
        try:
            while state.step < self.total_steps:
                loss = self.train_step()
                lr = self.optimizer.param_groups[0]["lr"]
                self.log({"event": "step", "step": state.step, "loss": loss, "lr": lr})
                if cfg.eval_interval and (state.step - 1) % cfg.eval_interval == 0:
                    self.evaluate()
                if self.epoch_done:
                    self.end_of_epoch()
                if cfg.save_interval and state.step % cfg.save_interval == 0:
                    last_ckpt = self.save()
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}",
                                tok_s=f"{(state.tokens_seen - tokens0) / max(elapsed, 1e-9):.0f}")
                bar.update(1)
                if self._stop_requested:
                    bar.close()
                    path = self.save()
                    if self.dist.is_main:
                        print(f"interrupted at step {state.step}: checkpoint saved to {path}; "
                              f"continue with --resume {path}", file=sys.stderr)
                    raise KeyboardInterrupt
        except NonFiniteLoss as e:
            kept = list_checkpoints(self.out_dir)
            where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written"
            raise NonFiniteLoss(f"{e}: stopping; {where} (try a lower --lr or --grad-clip)") from None
        finally:
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        elapsed = time.perf_counter() - t0
        if not self.epoch_done:
            self.end_of_epoch()
        if last_ckpt is None or last_ckpt.name != f"step-{state.step:06d}":
            last_ckpt = self.save()
        if not h.get("step") or h["step"][-1] != state.step:
            self.evaluate()
        return {"final": {k: v[-1] for k, v in h.items()},
                "tokens_per_s": (state.tokens_seen - tokens0) / max(elapsed, 1e-9),
                "checkpoint": last_ckpt, "metrics": self.metrics_file,
                "plot": self.task.plot(h, self.out_dir) if self.dist.is_main else None,
                "steps": state.step, "seconds": elapsed}


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name))


def make_reporter(report_to: str, out_dir: Path):
    """A callable taking each metrics record: TensorBoard, Weights & Biases, or nothing."""
    if report_to == "none":
        return lambda record: None
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from e
        writer = SummaryWriter(str(out_dir / "tensorboard"))

        def to_tensorboard(record: dict[str, Any]) -> None:
            for key in ("loss", "lr", "train_loss", "val_loss"):
                if key in record:
                    writer.add_scalar(key, record[key], record["step"])
            writer.flush()
        return to_tensorboard
    if report_to == "wandb":
        try:
            import wandb
        except ImportError as e:
            raise ValueError("--report-to wandb needs the wandb package: pip install wandb") from e
        run = wandb.init(project="minigpt", dir=str(out_dir))
        return lambda record: run.log({k: v for k, v in record.items()
                                       if isinstance(v, (int, float)) and k != "step"}, step=record["step"])
    raise ValueError(f"unknown --report-to {report_to!r}; use none, tensorboard or wandb")


# ----------------------------------------------------------------------------------------------
# Command line.

MODEL_FLAGS = ("context_length", "emb_dim", "n_layers", "n_heads", "drop_rate", "qkv_bias",
               "tie_weights", "attention", "init")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minigpt.train",
        description="Train a GPT on text. The defaults reproduce the tutorial's chapter 5: GPT-2 124M "
                    "with context 256 on the-verdict for 10 epochs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="a named corpus (the-verdict, tinyshakespeare), a .txt file, "
                   "a directory of .txt files, a .csv or a .jsonl file")
    g.add_argument("--data-dir", default=d.data_dir, help="where named corpora live ($MINIGPT_DATA_DIR or data/)")
    g.add_argument("--text-column", default=d.text_column, help="text column of a .csv / field of a .jsonl")
    g.add_argument("--val-ratio", type=float, default=d.val_ratio, help="fraction of tokens held out")
    g.add_argument("--stride", type=int, default=d.stride, help="window stride (default: context length)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="gpt2", help="gpt2 (124M), gpt2-medium, gpt2-large, gpt2-xl or tiny")
    g.add_argument("--init-from", default=None, help="start from pretrained weights: gpt2, ... or a directory")
    g.add_argument("--context-length", type=int, default=256, help="tokens per window")
    g.add_argument("--emb-dim", type=int, default=None, help="override the preset's embedding size")
    g.add_argument("--n-layers", type=int, default=None, help="override the preset's layer count")
    g.add_argument("--n-heads", type=int, default=None, help="override the preset's head count")
    g.add_argument("--drop-rate", type=float, default=None, help="override the preset's dropout")
    g.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=None, help="biases on Q, K, V")
    g.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="share the output head with the token embedding")
    g.add_argument("--attention", choices=("sdpa", "reference"), default=None, help="attention path")
    g.add_argument("--init", choices=("gpt2", "torch"), default="torch",
                   help="weight initialisation: torch (PyTorch's default, as the tutorial's model: its wide "
                        "N(0, 1) embeddings fit a short text within the chapter-5 run's 90 steps) or gpt2 "
                        "(the paper's std-0.02 init, the library default, slower to start at lr 5e-4)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps instead")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="cosine floor (default: lr, no decay)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay on weight matrices")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm (off if unset)")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype,
                   help="bfloat16/float16 train under autocast with float32 weights")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps (under torchrun: "
                   "cuda means one GPU per local rank)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun, shard parameters, gradients and "
                   "optimizer state over the ranks (FSDP) instead of replicating the model (DDP)")
    g.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a rank waits for the others before the job fails")
    g.add_argument("--compile", action="store_true", help="torch.compile the training step's model (the first "
                   "step then takes a minute or more to compile; needs a C++ compiler on the CPU)")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the weights, dropout and data order")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval, help="evaluate every N steps (0: never)")
    g.add_argument("--eval-iters", type=int, default=d.eval_iters, help="batches per evaluation")
    g.add_argument("--sample-prompt", default=d.sample_prompt, help="prompt of the sample printed each epoch")
    g.add_argument("--out-dir", default=d.out_dir, help="run directory (default: runs/<data name>)")
    g.add_argument("--save-interval", type=int, default=d.save_interval,
                   help="checkpoint every N steps (always at the end and on Ctrl-C)")
    g.add_argument("--keep-last", type=int, default=d.keep_last, help="checkpoints kept")
    g.add_argument("--resume", default=None, help="a checkpoint directory, or 'latest' in --out-dir")
    g.add_argument("--report-to", choices=("none", "tensorboard", "wandb"), default=d.report_to,
                   help="also send metrics there")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    positive = ("epochs", "batch_size", "grad_accum", "eval_iters", "keep_last", "context_length")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("max_steps", "save_interval", "stride"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.min_lr is not None and not 0 <= args.min_lr <= args.lr:
        raise ValueError(f"--min-lr must be in [0, lr={args.lr}], got {args.min_lr}")
    if args.eval_interval < 0 or args.warmup_steps < 0 or args.weight_decay < 0:
        raise ValueError("--eval-interval, --warmup-steps and --weight-decay must not be negative")
    if not 0 < args.val_ratio < 1:
        raise ValueError(f"--val-ratio must be in (0, 1), got {args.val_ratio}")


def model_config(args: argparse.Namespace) -> GPTConfig:
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    return get_preset(args.preset, **overrides)


def resolve_resume(resume: str, out_dir: Path) -> Path:
    if resume != "latest":
        return Path(resume)
    found = list_checkpoints(out_dir)
    if not found:
        raise CheckpointError(f"--resume latest: no checkpoint in {out_dir / 'checkpoints'}")
    return found[-1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse flags; when resuming, the checkpoint's flags are the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is None:
        return args
    ckpt = resolve_resume(args.resume, Path(args.out_dir or default_out_dir(args.data)))
    ckpt_cfg, meta = read_config(ckpt)
    saved = meta.get("train_args")
    if saved is None:
        raise CheckpointError(f"{ckpt}: not a training checkpoint (no train_args in its config.json)")
    parser.set_defaults(**saved)
    args = parser.parse_args(argv)
    args.resume = str(ckpt)
    def in_checkpoint(k: str) -> Any:
        return getattr(ckpt_cfg, k) if k in MODEL_FLAGS and saved.get(k) is None else saved.get(k)

    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint: {in_checkpoint(k)})"
               for k in (*MODEL_FLAGS, "preset", "init_from") if getattr(args, k) != saved.get(k)]
    if changed:
        raise ValueError(f"cannot resume {ckpt} with a different model config: {', '.join(changed)}")
    return args


def default_out_dir(data: str) -> Path:
    return Path("runs") / Path(data).stem


def crop_context(model: GPTModel, context_length: int) -> None:
    """Shorten a model's context (e.g. pretrained GPT-2's 1024) by keeping the first positions."""
    if context_length > model.cfg.context_length:
        raise ValueError(f"--context-length {context_length} exceeds the pretrained model's "
                         f"{model.cfg.context_length}")
    model.pos_emb.weight = nn.Parameter(model.pos_emb.weight.detach()[:context_length].clone())
    model.pos_emb.num_embeddings = context_length
    model.cfg = model.cfg.replace(context_length=context_length)
    for block in model.trf_blocks:
        block.att.context_length = context_length


def build_model(args: argparse.Namespace) -> GPTModel:
    torch.manual_seed(args.seed)
    if not args.init_from:
        return GPTModel(model_config(args))
    from .weights import from_pretrained

    overrides = {k: getattr(args, k) for k in ("drop_rate", "attention") if getattr(args, k) is not None}
    model = from_pretrained(args.init_from, **overrides)
    if args.context_length != model.cfg.context_length:
        crop_context(model, args.context_length)
    return model.train()


def setup(args: argparse.Namespace, dist_info: DistInfo | None = None,
          device: torch.device | None = None) -> Trainer:
    """Data, model, optimizer and run directory for `args` (fresh or resumed)."""
    check_args(args)
    dist_info = dist_info or DistInfo()
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
    out_dir = Path(args.out_dir or default_out_dir(args.data))
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} exists and is not a directory")
    tokenizer = get_tokenizer()
    if args.resume:
        trainer_state = load_trainer_state(args.resume)
        model = load_model(args.resume).train()
    else:
        model = build_model(args)
        # Every rank starts from the same weights; dropout then draws a different stream per rank.
        torch.manual_seed(args.seed + dist_info.rank)
    ctx = model.cfg.context_length
    ids = None
    for turn in ("main", "others"):  # rank 0 tokenizes and caches first; the others then read its cache
        if (turn == "main") == dist_info.is_main:
            ids = data_lib.load_token_ids(args.data, tokenizer, text_column=args.text_column, data_dir=args.data_dir)
        barrier()
    train_ids, val_ids = data_lib.split_tokens(ids, args.val_ratio, ctx)
    train_set = data_lib.TokenWindowDataset(train_ids, ctx, args.stride or ctx)
    val_set = data_lib.TokenWindowDataset(val_ids, ctx, ctx)

    out_dir.mkdir(parents=True, exist_ok=True)
    saved_args = {k: v for k, v in vars(args).items() if k not in ("resume", "progress")}
    task = LanguageModelTask(tokenizer, args.sample_prompt, cfg.sample_tokens)
    trainer = Trainer(model, cfg, train_set, val_set, task, out_dir, saved_args, dist_info, device, args.fsdp)
    if args.resume:
        trainer.restore(trainer_state)
    elif dist_info.is_main:
        trainer.metrics_file.unlink(missing_ok=True)  # a fresh run starts a fresh log
    return trainer


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metrics logged after `step` by the run being resumed (they will be logged again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()
    dist_info = DistInfo()
    try:
        args = parse_args(argv)
        dist_info, device = init_distributed(args.device, args.dist_timeout)
        trainer = setup(args, dist_info, device)
        cfg = trainer.module.cfg
        if dist_info.is_main:
            print(f"model: {trainer.module.num_parameters():,} parameters ({cfg.n_layers} layers, {cfg.n_heads} "
                  f"heads, {cfg.emb_dim} dims, context {cfg.context_length}); data: {len(trainer.train_set)} "
                  f"train / {len(trainer.val_set)} val windows; global batch {trainer.global_batch * args.grad_accum}"
                  f" = {args.batch_size} per rank x {args.grad_accum} accumulated x {dist_info.world_size} "
                  f"rank(s); {trainer.total_steps} steps on {device}", file=sys.stderr)
        result = trainer.fit()
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, CheckpointError, NonFiniteLoss, RuntimeError) as e:
        print(f"error: {e}" if not dist_info.enabled else f"error (rank {dist_info.rank}): {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if not dist_info.is_main:
        return 0
    final = result["final"]
    print(f"final: train loss {final['train_loss']:.3f} (perplexity {perplexity(final['train_loss']):.1f}), "
          f"val loss {final['val_loss']:.3f} (perplexity {perplexity(final['val_loss']):.1f}); "
          f"{result['steps']} steps in {result['seconds']:.0f} s, {result['tokens_per_s']:.0f} tokens/s")
    print(f"checkpoint: {result['checkpoint']}\nmetrics: {result['metrics']}\nplot: {result['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
