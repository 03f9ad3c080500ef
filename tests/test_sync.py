"""No host synchronisation per training step beyond the logging interval (issue 24): the host reads
the device's numbers (`.item()`, `.tolist()`, `bool()`, ...) once per `log_interval` steps, and a
non-finite step is still skipped on the device and judged when read."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from minigpt import GPTModel
from minigpt.data import TokenWindowDataset
from minigpt.errors import NonFiniteLoss
from minigpt.training import LanguageModelTask, Trainer, TrainConfig

# Every way Python reads a tensor's value on the host: each one waits for the device.
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"}


class CountReads(TorchFunctionMode):
    """Counts host reads of tensor values (a counting wrapper of `Tensor.item` and its kin)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in READS
        return func(*args, **(kwargs or {}))


class PlainLossTask(LanguageModelTask):
    """The language-model task with `F.cross_entropy` on the logits: a loss that itself reads nothing,
    so that the count is the trainer's own."""

    def loss(self, model, batch, device):
        logits = model(batch[0].to(device))
        return F.cross_entropy(logits.flatten(0, 1), batch[1].to(device).flatten())

    def evaluate(self, model, batches, device):  # the loss alone: bits per byte decode the whole vocabulary
        losses = [self.loss(model, batch, device).item() for batch in batches]
        return {"loss": sum(losses) / len(losses)}

    def plot(self, history, out_dir):
        return None


def make_trainer(tiny_cfg, tmp_path, tokenizer, task_class=PlainLossTask, device="cpu", **cfg) -> Trainer:
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_cfg.vocab_size, (4000,), generator=torch.Generator().manual_seed(1)).numpy()
    train, val = TokenWindowDataset(ids[:3600], 16, 16), TokenWindowDataset(ids[3600:], 16, 16)
    cfg.setdefault("grad_clip", 1.0)
    config = TrainConfig(batch_size=2, eval_interval=0, progress=False, device=device, **cfg)
    return Trainer(GPTModel(tiny_cfg.replace(context_length=16)), config, train, val,
                   task_class(tokenizer, "a", 2), tmp_path, {})


@pytest.mark.parametrize("log_interval,grad_accum", [(1, 1), (5, 2)])
def test_the_host_reads_once_per_log_interval(tiny_cfg, tmp_path, tokenizer, log_interval, grad_accum):
    """10 more steps cost 10 / log_interval more reads, whatever else a run reads once (its final
    evaluation, sample and checkpoint)."""
    def reads(steps: int) -> int:
        trainer = make_trainer(tiny_cfg, tmp_path / f"{steps}", tokenizer, max_steps=steps,
                               log_interval=log_interval, grad_accum=grad_accum)
        with CountReads() as counter:
            trainer.fit()
        return counter.count

    assert reads(20) - reads(10) == 10 // log_interval


def test_a_training_step_reads_nothing(tiny_cfg, tmp_path, tokenizer):
    trainer = make_trainer(tiny_cfg, tmp_path, tokenizer, max_steps=10, log_interval=10, grad_clip=0.5)
    trainer.train_step()  # the first step of an epoch reads the epoch's window order, once
    with CountReads() as counter:
        for _ in range(5):
            trainer.train_step()
    assert counter.count == 0 and len(trainer.pending) == 6
    with CountReads() as counter:
        trainer.read_steps()
    assert counter.count == 1 and len(trainer.pending) == 0


def test_the_log_interval_changes_no_number(tiny_cfg, tmp_path, tokenizer):
    """Weights after 12 steps are the same read every step or every 5; the logged loss of an
    interval is the mean of its steps' losses."""
    runs = {}
    for interval in (1, 5):
        trainer = make_trainer(tiny_cfg, tmp_path / str(interval), tokenizer, max_steps=12, log_interval=interval)
        trainer.fit()
        records = [r for r in map(json.loads, trainer.metrics_file.read_text().splitlines()) if r["event"] == "step"]
        runs[interval] = (trainer.model.state_dict(), records)
    (w1, every), (w5, fifth) = runs[1], runs[5]
    assert all(torch.equal(w1[k], w5[k]) for k in w1)
    assert [r["step"] for r in fifth] == [5, 10, 12]
    losses = [r["loss"] for r in every]
    for record, span in zip(fifth, ((0, 5), (5, 10), (10, 12)), strict=True):
        assert record["loss"] == pytest.approx(sum(losses[span[0]:span[1]]) / (span[1] - span[0]), rel=1e-12)
        assert record["lr"] == every[span[1] - 1]["lr"]


class NanAt(PlainLossTask):
    """A loss that is NaN at the given training calls (1-based)."""

    bad: set[int] = set()

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls = 0

    def loss(self, model, batch, device):
        value = super().loss(model, batch, device)
        if model.training:
            self.calls += 1
            if self.calls in self.bad:
                return value * math.nan
        return value


def test_a_bad_step_is_skipped_on_the_device_and_judged_when_read(tiny_cfg, tmp_path, tokenizer, capsys):
    """Step 3's loss is NaN (log interval 4, --max-bad-steps 2): its update is skipped without a
    read, the message comes at the read, and the weights equal a run whose step 3 did nothing."""
    NanAt.bad = {4}
    trainer = make_trainer(tiny_cfg, tmp_path, tokenizer, NanAt, max_steps=4, log_interval=4, max_bad_steps=2)
    before = None
    for step in range(4):
        if step == 3:
            before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train_step()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.optimizer.state[next(trainer.model.parameters())]["step"].item() == 3
    capsys.readouterr()
    trainer.read_steps()
    assert "step 3: loss became nan; update skipped (1 of --max-bad-steps 2)" in capsys.readouterr().out
    assert trainer.guard.good_step == 2


def test_the_run_stops_at_the_read_naming_the_bad_step(tiny_cfg, tmp_path, tokenizer):
    NanAt.bad = {2}
    trainer = make_trainer(tiny_cfg, tmp_path, tokenizer, NanAt, max_steps=8, log_interval=4)
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 1"):
        trainer.fit()
    assert trainer.state.step == 4  # stopped at the read after the bad step, not before it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_cuda_synchronisation_between_reads(tiny_cfg, tmp_path, tokenizer):
    trainer = make_trainer(tiny_cfg, tmp_path, tokenizer, device="cuda", max_steps=10, log_interval=10)
    trainer.train_step()  # the first step allocates and initialises
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
