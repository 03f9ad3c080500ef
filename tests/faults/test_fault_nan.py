"""A non-finite loss or gradient: the update is skipped, the run stops after --max-bad-steps, only
checkpoints whose weights gave a finite loss are named good, and non-finite weights are never saved."""

from __future__ import annotations

import torch
from faultkit import assert_recovers, resume, tiny_args

from minigpt.checkpoint import load_model
from minigpt.cli.train import main
from minigpt.training import LanguageModelTask, list_checkpoints
from minigpt.training.precision import Precision


class InfiniteGradient(torch.autograd.Function):
    """Zero on the way forward, infinite gradients on the way back."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("inf"))


class Poisoned:
    """`LanguageModelTask.loss`, whose training losses number `bad_calls` (1-based) become NaN
    (`kind` "loss") or get infinite gradients ("grads")."""

    def __init__(self, bad_calls: set[int], kind: str) -> None:
        self.real, self.bad_calls, self.kind, self.calls = LanguageModelTask.loss, bad_calls, kind, 0

    def __call__(self, task, model, batch, device):
        value = self.real(task, model, batch, device)
        self.calls += model.training
        if not model.training or self.calls not in self.bad_calls:
            return value
        if self.kind == "loss":
            return value * float("nan")
        return value + InfiniteGradient.apply(next(p for p in model.parameters() if p.requires_grad))


def poison(monkeypatch, bad_calls: set[int], kind: str) -> None:
    poisoned = Poisoned(bad_calls, kind)
    monkeypatch.setattr(LanguageModelTask, "loss", lambda task, *args: poisoned(task, *args))


def test_the_last_good_checkpoint_is_one_whose_weights_gave_a_finite_loss(monkeypatch, corpus, tmp_path, capsys):
    """Saved every step, keep-last 1: the NaN at step 3 comes from step-3's weights, so step-2 is
    the last good one; it is kept (though keep-last is 1) and step-3 is set aside."""
    poison(monkeypatch, {4}, "loss")
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "6", "--save-interval", "1", "--keep-last", "1")) == 2
    err = capsys.readouterr().err
    assert "loss became nan at step 3" in err and f"the last good checkpoint is {out}/checkpoints/step-000002" in err
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    assert (out / "checkpoints" / "step-000003.nonfinite").is_dir()
    monkeypatch.undo()
    assert_recovers(out, 4, newest=2)


def test_non_finite_gradients_skip_the_update(monkeypatch, corpus, tmp_path, capsys):
    """--max-bad-steps 2: one step with infinite gradients is skipped and the run goes on."""
    poison(monkeypatch, {3}, "grads")
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "4", "--max-bad-steps", "2")) == 0
    printed = capsys.readouterr()
    assert "step 2: the gradients became non-finite; update skipped (1 of --max-bad-steps 2)" in printed.out
    assert all(torch.isfinite(p).all() for p in load_model(list_checkpoints(out)[-1]).parameters())


def test_the_weights_are_unchanged_by_a_skipped_update(monkeypatch, corpus, tmp_path):
    poison(monkeypatch, {3}, "grads")
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "3", "--save-interval", "1", "--max-bad-steps", "2",
                          "--keep-last", "5")) == 0
    before, after = (load_model(out / "checkpoints" / f"step-00000{i}").state_dict() for i in (2, 3))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_gradients_stop_at_the_default_of_one_bad_step(monkeypatch, corpus, tmp_path, capsys):
    poison(monkeypatch, {3}, "grads")
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "4", "--save-interval", "1", "--keep-last", "1")) == 2
    err = capsys.readouterr().err
    # The loss of step 2 was finite: its weights (those of step-2, unchanged by the skipped update) are good.
    assert "the gradients became non-finite at step 2" in err and "the last good checkpoint is" in err
    assert "step-000002" in err
    monkeypatch.undo()
    assert_recovers(out, 3, newest=2)


def test_consecutive_bad_steps_stop_the_run(monkeypatch, corpus, tmp_path, capsys):
    """Training losses 3 to 5 (steps 2 to 4) are NaN: with --max-bad-steps 3 the run stops at the
    third; the skipped steps' checkpoints hold step 2's weights, which gave the first NaN."""
    poison(monkeypatch, {3, 4, 5}, "loss")
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "6", "--max-bad-steps", "3", "--save-interval", "1")) == 2
    err = capsys.readouterr().err
    assert "loss became nan at step 4 (3 bad steps in a row)" in err and "step-000001 (try" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-000001", "step-000002.nonfinite", "step-000003.nonfinite", "step-000004.nonfinite"]
    monkeypatch.undo()
    assert_recovers(out, 2, newest=1)


def test_non_finite_weights_are_never_saved(monkeypatch, corpus, tmp_path, capsys):
    real = Precision.step

    def step_to_inf(self, optimizer, parameters, grad_clip, norm):
        real(self, optimizer, parameters, grad_clip, norm)
        with torch.no_grad():
            next(iter(optimizer.param_groups[0]["params"]))[0, 0] = float("inf")

    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "2", "--save-interval", "1")) == 0
    monkeypatch.setattr(Precision, "step", step_to_inf)
    assert resume(out, 4) == 2
    assert "the weights became non-finite at step 3; they were not saved" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(out)][-1] == "step-000002"
    monkeypatch.undo()
    assert_recovers(out, 3, newest=2)
