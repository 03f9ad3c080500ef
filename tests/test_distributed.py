"""Multi-process training on the CPU with gloo, launched by torchrun as a user would."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt.checkpoint import load_model
from tests.test_train import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(1)
    words = ["alpha", "beta", "gamma", "delta", "moves", "you", "every", "effort", "stone", "river"]
    text = "\n".join(" ".join(words[i] for i in torch.randint(0, len(words), (9,), generator=gen).tolist())
                     for _ in range(400))
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def train_args(corpus: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["--data", str(corpus), "--preset", "tiny", "--context-length", "16", "--emb-dim", "32",
            "--n-heads", "2", "--drop-rate", "0", "--batch-size", str(batch_size), "--grad-accum", "2",
            "--max-steps", "6", "--eval-interval", "2", "--eval-iters", "4", "--lr", "3e-3", "--seed", "5",
            "--out-dir", str(out), "--no-progress", *extra]


def run(nproc: int, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "minigpt.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "minigpt.train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def step_losses(out: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out / "metrics.jsonl") if m["event"] == "step"]


def eval_losses(out: Path) -> list[float]:
    return [m["val_loss"] for m in read_metrics(out / "metrics.jsonl") if m["event"] == "eval"]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    result = run(1, train_args(corpus, out, batch_size=4))
    assert result.returncode == 0, result.stderr
    return out


def assert_same_run(a: Path, b: Path) -> None:
    assert step_losses(a) == pytest.approx(step_losses(b), abs=1e-5)
    assert eval_losses(a) == pytest.approx(eval_losses(b), abs=1e-5)
    wa = load_file(a / "checkpoints" / "step-000006" / "model.safetensors")
    wb = load_file(b / "checkpoints" / "step-000006" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-5, msg=name)


def test_two_ranks_match_one_process_with_twice_the_batch(corpus, single, tmp_path):
    out = tmp_path / "ddp"
    result = run(2, train_args(corpus, out, batch_size=2))
    assert result.returncode == 0, result.stderr
    assert "global batch 8 = 2 per rank x 2 accumulated x 2 rank(s)" in result.stderr
    assert result.stdout.count("final: train loss") == 1  # only rank 0 prints
    assert len(step_losses(out)) == 6
    assert_same_run(single, out)


def test_fsdp_matches_and_its_checkpoint_loads_in_one_process(corpus, single, tmp_path):
    out = tmp_path / "fsdp"
    result = run(2, train_args(corpus, out, 2, "--fsdp"))
    assert result.returncode == 0, result.stderr
    assert_same_run(single, out)
    model = load_model(out / "checkpoints" / "step-000006")
    assert model.cfg.emb_dim == 32


def test_resume_with_another_world_size(corpus, tmp_path):
    """A 2-rank run stopped at step 3 continues in one process with batch 4: same losses."""
    full = tmp_path / "full"
    assert run(2, train_args(corpus, full, 2, "--save-interval", "3", "--keep-last", "3")).returncode == 0
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    os.symlink(full / "checkpoints" / "step-000003", part / "checkpoints" / "step-000003")
    result = run(1, ["--resume", "latest", "--out-dir", str(part), "--batch-size", "4", "--no-progress"])
    assert result.returncode == 0, result.stderr
    assert step_losses(part) == pytest.approx(step_losses(full)[3:], abs=1e-5)


def test_a_killed_rank_ends_the_job_with_an_error(corpus, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = train_args(corpus, out, 2)
    args[args.index("--max-steps") + 1] = "100000"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "minigpt.train", *args, "--dist-timeout", "60"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"step"') >= 3):
        time.sleep(0.5)
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "minigpt.train"], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2, workers.stdout
    os.kill(pids[1], signal.SIGKILL)
    try:
        proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode not in (0, None)
    assert json.loads(metrics.read_text().splitlines()[-1])  # the log is intact
