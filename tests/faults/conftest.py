"""The fixtures of the reliability tests: a tiny run to damage (see faultkit for the helpers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from faultkit import tiny_args

from minigpt.cli.train import main
from minigpt.training import LanguageModelTask


@pytest.fixture(autouse=True)
def _no_samples(monkeypatch):
    """The end-of-epoch sample (50 decoding steps) and the plot are irrelevant here and the slowest
    parts of a run."""
    monkeypatch.setattr(LanguageModelTask, "end_of_epoch", lambda self, model, device: None)
    monkeypatch.setattr(LanguageModelTask, "plot", lambda self, history, out_dir: None)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small varied text (about 1,500 tokens), tokenized once for the session."""
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dog", "ran", "past", "every", "effort"]
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=gen).tolist()) + "."
             for _ in range(150)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def base_run(corpus, tmp_path_factory) -> Path:
    """A run stopped at step 4, checkpoints step-2 and step-4 (--keep-last 2)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "4", "--save-interval", "2", "--keep-last", "2")) == 0
    return out


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out
