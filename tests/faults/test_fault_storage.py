"""A full disk or a file-size limit during a save: one line naming the file, the previous checkpoint intact."""

from __future__ import annotations

import errno
import io
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from faultkit import assert_recovers, resume
from safetensors import SafetensorError

import minigpt.checkpoint
import minigpt.training.metrics

ROOT = Path(__file__).resolve().parents[2]


def last_line(capsys) -> str:
    """The error: one line, after the run's description."""
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    return last


def test_no_space_while_writing_the_weights(monkeypatch, run_copy, capsys):
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(minigpt.checkpoint, "save_file", full)
        capsys.readouterr()
        assert resume(run_copy, 6) == 2
    err = last_line(capsys)
    assert err == (f"error: checkpoint step-000006 not saved: {run_copy / 'checkpoints' / 'step-000006'}/"
                   f"model.safetensors: no space left on device; the previous checkpoint "
                   f"{run_copy / 'checkpoints' / 'step-000004'} is intact")
    assert f"the previous checkpoint {run_copy / 'checkpoints' / 'step-000004'} is intact" in err
    assert_recovers(run_copy, 5, newest=4)


class FullDisk(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""

    def __init__(self, file, mode: str, room: int = 1000) -> None:
        super().__init__(file, mode)
        self.room = room

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_no_space_while_writing_trainer_pt(monkeypatch, run_copy, capsys):
    with monkeypatch.context() as m:
        m.setattr(minigpt.checkpoint, "open", lambda file, mode: FullDisk(file, mode), raising=False)
        capsys.readouterr()
        assert resume(run_copy, 6) == 2
    err = last_line(capsys)
    assert "step-000006/trainer.pt: no space left on device" in err and "enforce fail" not in err
    assert "step-000004 is intact" in err
    assert_recovers(run_copy, 5, newest=4)


def test_no_space_while_logging_metrics(monkeypatch, run_copy, capsys):
    with monkeypatch.context() as m:
        m.setattr(minigpt.training.metrics, "open",
                  lambda file, mode, encoding: io.TextIOWrapper(FullDisk(file, "ab", room=0), encoding=encoding),
                  raising=False)
        capsys.readouterr()
        assert resume(run_copy, 6) == 2
    assert "metrics.jsonl: no space left on device (a record was not logged)" in last_line(capsys)
    assert_recovers(run_copy, 5, newest=4)


def _limit_file_size() -> None:
    limit = 1 << 20  # below the size of the weights
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_file_size_limit_in_a_child_process(run_copy):
    """`ulimit -f`, for real: the child's write fails with EFBIG (Python ignores SIGXFSZ)."""
    proc = subprocess.run([sys.executable, "-m", "minigpt.train", "--resume", "latest", "--out-dir", str(run_copy),
                           "--max-steps", "6", "--no-progress"], preexec_fn=_limit_file_size,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint step-000006 not saved: ") and "Traceback" not in proc.stderr
    assert "model.safetensors: file too large" in last and "step-000004 is intact" in last
    assert_recovers(run_copy, 5, newest=4)


@pytest.mark.parametrize("limit", [1 << 20])
def test_the_token_cache_under_a_size_limit_is_one_line(tmp_path, limit):
    text = tmp_path / "big.txt"
    text.write_text("word " * 600_000)  # over a megabyte of tokens
    code = ("import sys; from minigpt.cli.train import main; "
            f"sys.exit(main(['--data', {str(text)!r}, '--preset', 'tiny', '--out-dir', {str(tmp_path / 'run')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], preexec_fn=_limit_file_size, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'big.txt.tokens.bin'}: file too large (the token cache was not written)")
    assert not list(tmp_path.glob(".big.txt.tokens*"))
