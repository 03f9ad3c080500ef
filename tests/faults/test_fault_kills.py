"""kill -9 at each file operation of a save, a rotation, a re-save and the metrics rewrite: the
newest complete checkpoint is always a `step-*` directory that loads, and `--resume latest` continues."""

from __future__ import annotations

import shutil

import pytest
from faultkit import Faults, Killed, assert_recovers, resume

import minigpt.files
from minigpt.training import list_checkpoints


def count_ops(monkeypatch, out, *flags) -> list[str]:
    with monkeypatch.context() as m:
        faults = Faults(m)
        assert resume(out, *flags) == 0
    return faults.ops


def kill_and_recover(monkeypatch, base_run, tmp_path, max_steps: int, final: int, exchange: bool) -> int:
    """For each N: copy the run, resume it to `max_steps` killed at the N-th file operation, then
    check it recovers to `final`. Returns how many operations were tried."""
    if not exchange:
        monkeypatch.setattr(minigpt.files, "_exchange", lambda a, b: False)  # the two-rename fallback
    ops = count_ops(monkeypatch, shutil.copytree(base_run, tmp_path / "count"), max_steps)
    renames = [i for i, name in enumerate(ops, 1) if name in ("replace", "_exchange")]
    for n in range(1, len(ops) + 1):
        out = shutil.copytree(base_run, tmp_path / f"kill-{n}")
        with monkeypatch.context() as m:
            with pytest.raises(Killed):
                resume_killed(Faults(m, kill_at=n), out, max_steps)
        # The new checkpoint is complete once its rename into place (after the metrics') is done.
        newest = max_steps if max_steps > 4 and n > renames[1] else 4
        assert_recovers(out, final, newest)
    return len(ops)


def resume_killed(faults: Faults, out, max_steps: int) -> None:
    resume(out, max_steps)
    raise AssertionError(f"not killed: only {faults.count} operations")


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False])
def test_kill_at_each_operation_of_save_rotate_and_metrics_rewrite(monkeypatch, base_run, tmp_path, exchange):
    """Resumed from step 4 to 6: the metrics rewrite, the save of step-6, the pruning of step-2."""
    assert kill_and_recover(monkeypatch, base_run, tmp_path, 6, 7, exchange) > 10


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False])
def test_kill_at_each_operation_of_a_re_save(monkeypatch, base_run, tmp_path, exchange):
    """Resumed at step 4 with nothing left to do: step-4 is saved again over itself."""
    assert kill_and_recover(monkeypatch, base_run, tmp_path, 4, 5, exchange) > 5


@pytest.mark.parametrize("max_steps,exchange,op,nth,newest", [
    (6, True, "replace", 1, 4),  # the metrics rewrite's rename
    (6, True, "save_file", 1, 4),  # writing step-6's weights
    (6, True, "save", 1, 4),  # writing step-6's trainer.pt
    (6, True, "replace", 2, 4),  # step-6 renamed into place
    (6, True, "replace", 3, 6),  # step-2 renamed away to be pruned
    (6, True, "unlink", 1, 6),  # step-2 half deleted
    (4, True, "_exchange", 1, 4),  # step-4 re-saved: the exchange
    (4, True, "unlink", 1, 4),  # the old step-4 half deleted
    (4, False, "replace", 2, 4),  # no exchange: the old step-4 renamed away
    (4, False, "replace", 3, 4),  # ... and killed between the renames (the case)
], ids=["metrics-rewrite", "save-weights", "save-trainer", "save-rename", "prune-rename", "prune-rmtree",
        "resave-exchange", "resave-rmtree", "resave-fallback-1", "resave-fallback-2"])
def test_kill_at_a_chosen_operation(monkeypatch, base_run, run_copy, tmp_path, max_steps, exchange, op, nth,
                                    newest):
    """The quick version of the above, one chosen operation each."""
    if not exchange:
        monkeypatch.setattr(minigpt.files, "_exchange", lambda a, b: False)
    ops = count_ops(monkeypatch, shutil.copytree(base_run, tmp_path / "count"), max_steps)
    n = [i for i, name in enumerate(ops, 1) if name == op][nth - 1]
    with monkeypatch.context() as m:
        with pytest.raises(Killed):
            resume_killed(Faults(m, kill_at=n), run_copy, max_steps)
    assert_recovers(run_copy, max_steps + 1, newest)


def test_a_re_save_killed_between_its_renames_is_put_back(monkeypatch, run_copy):
    """The issue's case: no step-* left, the complete checkpoint in .step-N.old-*; start-up restores it."""
    ckpts = run_copy / "checkpoints"
    (ckpts / "step-000004").rename(ckpts / ".step-000004.old-12345")
    shutil.copytree(ckpts / "step-000002", ckpts / ".step-000004.tmp-abcdef")  # a half-written successor
    assert [p.name for p in list_checkpoints(run_copy)] == ["step-000002"]
    assert_recovers(run_copy, 5, newest=4)
    assert (ckpts / "step-000004").is_dir()


def test_start_up_removes_leftover_temporaries(run_copy):
    ckpts = run_copy / "checkpoints"
    shutil.copytree(ckpts / "step-000004", ckpts / ".step-000006.tmp-k1ll3d")
    shutil.copytree(ckpts / "step-000002", ckpts / ".step-000002.del-999")
    (run_copy / ".metrics.jsonl.tmp-zzz").write_text("partial")
    assert_recovers(run_copy, 5)
    assert not list(run_copy.glob(".metrics.jsonl.tmp-*"))
