"""One run per out-dir: an OS lock held for the run's lifetime, released however the run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from faultkit import assert_recovers, resume

from minigpt.training import Trainer

ROOT = Path(__file__).resolve().parents[2]


def test_a_second_process_is_refused_until_the_first_is_killed(run_copy, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from minigpt.files import lock_dir; "
         "lock = lock_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(300)", str(run_copy)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        capsys.readouterr()
        assert resume(run_copy, 6) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {run_copy} is in use by another run (pid {holder.pid} on {os.uname().nodename}); "
                       "wait for it to finish or pick another --out-dir\n")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert_recovers(run_copy, 5, newest=4)  # the killed holder's lock is gone


def test_a_run_holds_the_lock_for_its_lifetime(monkeypatch, run_copy, capsys):
    """While one run trains (here: at its first step), another on the same out-dir is refused."""
    real = Trainer.train_step
    seen = []

    def step_and_intrude(self):
        if not seen:
            seen.append(resume(run_copy, 9))
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", step_and_intrude)
    assert resume(run_copy, 5) == 0
    assert seen == [2] and "is in use by another run" in capsys.readouterr().err
    monkeypatch.undo()
    assert_recovers(run_copy, 6, newest=5)
