"""Fault injection for the reliability tests: a simulated kill -9 at the N-th file operation, the
tiny run's flags, and the check every case ends with (the newest checkpoint loads and
`--resume latest` continues)."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import minigpt.checkpoint
import minigpt.files
import minigpt.training.metrics
from minigpt.checkpoint import load_model, load_trainer_state
from minigpt.cli.train import main
from minigpt.training import list_checkpoints
from minigpt.training.checkpoints import recover_checkpoints


class Killed(BaseException):
    """The process died here: nothing after it touches the disk (see `Faults`)."""


class Faults:
    """Counts file operations (creating, writing, fsyncing, renaming, deleting); at the `kill_at`-th
    one the process "dies": that operation and every later one raise `Killed` instead of running,
    so no cleanup happens, as after kill -9. A `shutil.rmtree` killed midway deletes one file first."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kill_at: int | None = None) -> None:
        self.kill_at, self.count, self.dead, self.ops = kill_at, 0, False, []
        real_open = builtins.open
        targets = [(os, "replace"), (os, "rename"), (os, "fsync"), (os, "unlink"), (os, "rmdir"),
                   (shutil, "rmtree"), (tempfile, "mkdtemp"), (tempfile, "mkstemp"), (torch, "save"),
                   (minigpt.checkpoint, "save_file"), (minigpt.files, "_exchange"),
                   (Path, "write_text"), (Path, "rename"), (Path, "unlink")]
        for owner, name in targets:
            monkeypatch.setattr(owner, name, self._wrap(name, getattr(owner, name)))

        def writing_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                self.tick(f"open({Path(file).name}, {mode})")
            return real_open(file, mode, *args, **kwargs)

        for module in (minigpt.checkpoint, minigpt.training.metrics):
            monkeypatch.setattr(module, "open", writing_open, raising=False)

    def tick(self, what: str, partial=None) -> None:
        self.count += 1
        self.ops.append(what)
        if self.dead or self.count == self.kill_at:
            if not self.dead and partial is not None:
                partial()
            self.dead = True
            raise Killed(what)

    def _wrap(self, name: str, real):
        def op(*args, **kwargs):
            partial = None
            if name == "rmtree":
                partial = lambda: _delete_one(Path(args[0]))  # noqa: E731
            self.tick(name, partial)
            return real(*args, **kwargs)
        return op


def _delete_one(directory: Path) -> None:
    """Half of an rmtree: its first file (config.json first, the worst to lose) is gone."""
    files = sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.name != "config.json")
    if files:
        files[0].unlink()


def tiny_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus), "--preset", "tiny", "--context-length", "16", "--batch-size", "2",
            "--emb-dim", "16", "--n-layers", "1", "--n-heads", "2",
            "--eval-interval", "0", "--eval-iters", "1", "--out-dir", str(out), "--no-progress",
            "--seed", "1", *extra]


def resume(out: Path, max_steps: int, *extra: str) -> int:
    return main(["--resume", "latest", "--out-dir", str(out), "--max-steps", str(max_steps), "--no-progress",
                 *extra])


def assert_recovers(out: Path, max_steps: int, newest: int | None = None) -> None:
    """Every `step-*` checkpoint is complete and loads, the newest is step `newest` (once an
    interrupted re-save is undone), and `--resume latest` continues from it to `max_steps`,
    leaving one metrics record per step."""
    recover_checkpoints(out)
    kept = list_checkpoints(out)
    assert kept, f"no checkpoint left in {out}"
    if newest is not None:
        assert kept[-1].name == f"step-{newest:06d}"
    for ckpt in kept:
        load_model(ckpt)
        load_trainer_state(ckpt)
    assert resume(out, max_steps) == 0
    assert list_checkpoints(out)[-1].name == f"step-{max_steps:06d}"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "step"]
    assert steps == list(range(1, max_steps + 1))
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
