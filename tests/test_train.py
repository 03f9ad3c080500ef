import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt import GPTModel
from minigpt.book import train_model_simple
from minigpt.checkpoint import load_model
from minigpt.cli.train import main
from minigpt.errors import CheckpointError
from minigpt.training import LanguageModelTask, TrainConfig, configure_optimizer, lr_at

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """About 6,000 tokens of varied, learnable text."""
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dog", "ran", "past", "every", "effort", "moves", "you"]
    gen = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(600):
        idx = torch.randint(0, len(words), (8,), generator=gen).tolist()
        lines.append(" ".join(words[i] for i in idx) + ".")
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def tiny_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus), "--preset", "tiny", "--context-length", "32", "--batch-size", "4",
            "--eval-interval", "4", "--eval-iters", "2", "--out-dir", str(out), "--no-progress",
            "--seed", "1", *extra]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_run_trains_and_writes_checkpoint_metrics_and_plot(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--epochs", "2", "--lr", "1e-2", "--batch-size", "16")) == 0
    printed = capsys.readouterr().out
    assert "final: train loss" in printed and "perplexity" in printed and "tokens/s" in printed
    metrics = read_metrics(out / "metrics.jsonl")
    evals = [m for m in metrics if m["event"] == "eval"]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 1.0
    assert sum(m["event"] == "sample" for m in metrics) == 2  # one per epoch
    (ckpt,) = (out / "checkpoints").iterdir()
    model = load_model(ckpt)
    assert model.cfg.context_length == 32 and model.cfg.n_layers == 2
    assert (out / "loss-plot.png").stat().st_size > 1000
    steps = [m["step"] for m in metrics if m["event"] == "step"]
    assert steps == list(range(1, len(steps) + 1)) and ckpt.name == f"step-{steps[-1]:06d}"


def test_resume_continues_exactly(corpus, tmp_path):
    """Stopped at step 4 and resumed == uninterrupted, bit for bit (dropout, grad accumulation,
    warm-up and cosine schedule all in play)."""
    common = ("--max-steps", "8", "--save-interval", "4", "--keep-last", "5", "--drop-rate", "0.1",
              "--grad-accum", "2", "--warmup-steps", "2", "--min-lr", "1e-4", "--lr", "1e-3", "--epochs", "1")
    a = tmp_path / "a"
    assert main(tiny_args(corpus, a, *common)) == 0

    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step-000004", b / "checkpoints" / "step-000004")
    assert main(["--resume", "latest", "--out-dir", str(b), "--no-progress"]) == 0

    final_a = load_file(a / "checkpoints" / "step-000008" / "model.safetensors")
    final_b = load_file(b / "checkpoints" / "step-000008" / "model.safetensors")
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name
    losses_a = [m["loss"] for m in read_metrics(a / "metrics.jsonl") if m["event"] == "step"][4:]
    losses_b = [m["loss"] for m in read_metrics(b / "metrics.jsonl") if m["event"] == "step"]
    assert losses_b == losses_a


def test_resume_refuses_another_model_config(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "2")) == 0
    capsys.readouterr()
    assert main(["--resume", "latest", "--out-dir", str(out), "--n-layers", "3"]) == 2
    err = capsys.readouterr().err
    assert "different model config" in err and "--n-layers 3 (checkpoint: 2)" in err


def test_truncated_checkpoint_is_a_clear_error(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "2")) == 0
    (ckpt,) = (out / "checkpoints").iterdir()
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(ckpt)
    capsys.readouterr()
    assert main(["--resume", str(ckpt), "--no-progress"]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    real = LanguageModelTask.loss
    calls = {"n": 0}

    def exploding(self, model, batch, device):
        loss = real(self, model, batch, device)
        if model.training:
            calls["n"] += 1
            if calls["n"] > 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(LanguageModelTask, "loss", exploding)
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "10", "--save-interval", "2")) == 2
    err = capsys.readouterr().err
    assert "loss became nan at step 3" in err and "step-000002" in err
    (ckpt,) = (out / "checkpoints").iterdir()
    assert ckpt.name == "step-000002"
    assert all(torch.isfinite(p).all() for p in load_model(ckpt).parameters())


@pytest.mark.parametrize("native", [True, False])
def test_bf16_training_runs_and_warns_where_the_cpu_emulates_bf16(corpus, tmp_path, monkeypatch, native):
    import warnings

    import minigpt.training.precision as precision

    monkeypatch.setattr(precision, "cpu_has_bf16_arithmetic", lambda: native)
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(tiny_args(corpus, out, "--max-steps", "4", "--dtype", "bfloat16", "--lr", "1e-2")) == 0
    emulated = [w for w in caught if "no bfloat16 arithmetic" in str(w.message)]
    assert len(emulated) == (0 if native else 1)
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl") if m["event"] == "step"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_sigint_saves_a_loadable_checkpoint_and_exits(corpus, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "minigpt.train",
                             *tiny_args(corpus, out, "--max-steps", "100000", "--eval-interval", "0")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved to" in err
    (ckpt,) = (out / "checkpoints").iterdir()
    steps = [m["step"] for m in read_metrics(metrics) if m["event"] == "step"]
    assert ckpt.name == f"step-{steps[-1]:06d}"
    load_model(ckpt)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("flags,message", [
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--epochs", "-1"], "--epochs must be positive, got -1"),
    (["--batch-size", "500"], "not enough for one step of batch_size 500"),
    (["--context-length", "4000"], "fewer than"),
])
def test_cli_errors(corpus, tmp_path, capsys, flags, message):
    assert main(tiny_args(corpus, tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err


def test_cli_error_for_missing_data_and_file_out_dir(corpus, tmp_path, capsys):
    assert main(tiny_args(tmp_path / "nope.txt", tmp_path / "run")) == 2
    assert "nope.txt" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert main(tiny_args(corpus, blocker)) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg, 14) == pytest.approx(0.55)  # half way through the decay
    assert lr_at(14, cfg, 14) == pytest.approx(0.1) and lr_at(20, cfg, 14) == pytest.approx(0.1)
    assert lr_at(7, TrainConfig(lr=0.3), 10) == 0.3  # no min_lr: constant


def test_weight_decay_only_on_weight_matrices(tiny_cfg):
    model = GPTModel(tiny_cfg.replace(qkv_bias=True))
    decay, no_decay = configure_optimizer(model, 1e-3, 0.1, torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "trf_blocks.0.att.W_query.weight" in decayed and "out_head.weight" in decayed
    assert not any(n.endswith((".bias", ".scale", ".shift")) or "emb" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_train_model_simple_returns_the_tutorials_lists(tiny_cfg, tokenizer, capsys):
    cfg = tiny_cfg.replace(vocab_size=50257)
    model = GPTModel(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50257, (2, 16), generator=gen), torch.randint(0, 50257, (2, 16), generator=gen))
               for _ in range(3)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_losses, val_losses, tokens = train_model_simple(
        model, batches, batches[:1], optimizer, "cpu", num_epochs=2, eval_freq=2, eval_iter=1,
        start_context="Every effort moves you", tokenizer=tokenizer)
    assert tokens == [32, 96, 160]  # steps 0, 2, 4 of 6, 2 x 16 tokens each
    assert len(train_losses) == len(val_losses) == 3 and all(math.isfinite(v) for v in train_losses)
    printed = capsys.readouterr().out
    assert "Ep 1 (Step 000000): Train loss" in printed and printed.count("Every effort moves you") == 2


def test_cli_defaults_are_the_chapter5_setup():
    from minigpt.cli.train import build_parser, model_config

    args = build_parser().parse_args([])
    cfg = model_config(args)
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (50257, 256, 768, 12, 12)
    assert (cfg.drop_rate, cfg.qkv_bias, cfg.tie_weights, cfg.init) == (0.1, False, False, "torch")
    assert (args.data, args.batch_size, args.lr, args.weight_decay, args.epochs, args.seed) == \
        ("the-verdict", 2, 5e-4, 0.1, 10, 123)
    assert (args.eval_interval, args.eval_iters, args.val_ratio, args.stride) == (5, 5, 0.1, None)
    assert args.sample_prompt == "Every effort moves you"


@pytest.mark.slow
def test_compiled_training_gives_the_plain_losses(corpus, tmp_path):
    """`--compile` (torch.compile, needs a C++ compiler on the CPU): same losses, to float rounding."""
    def final_losses(out, *extra):
        assert main(tiny_args(corpus, out, "--max-steps", "8", *extra)) == 0
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(e["train_loss"], e["val_loss"]) for e in evals if e["event"] == "eval"]

    plain, compiled = final_losses(tmp_path / "plain"), final_losses(tmp_path / "compiled", "--compile")
    assert len(plain) == len(compiled) > 1
    torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-4)


def test_attention_flag_is_the_old_name_of_arithmetic():
    from minigpt.cli.train import build_parser

    parse = build_parser().parse_args
    assert parse(["--attention", "reference"]).arithmetic == "tutorial"
    assert parse(["--attention", "sdpa"]).arithmetic == "fast"
    assert parse(["--arithmetic", "tutorial"]).arithmetic == "tutorial" and parse([]).arithmetic is None


def test_a_checkpoint_of_the_old_format_resumes(corpus, tmp_path):
    """Checkpoints written before `attention` became `arithmetic`, with trainer.pt's `args` entry."""
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "2", "--attention", "reference")) == 0
    (ckpt,) = (out / "checkpoints").iterdir()
    config = json.loads((ckpt / "config.json").read_text())
    config["config"]["attention"] = {"tutorial": "reference"}[config["config"].pop("arithmetic")]
    train_args = config["train_args"]
    train_args["attention"] = {"tutorial": "reference"}[train_args.pop("arithmetic")]
    config.pop("files")  # nor did they record checksums
    (ckpt / "config.json").write_text(json.dumps(config))
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    torch.save({**trainer, "args": train_args}, ckpt / "trainer.pt")
    assert main(["--resume", "latest", "--out-dir", str(out), "--max-steps", "3", "--no-progress"]) == 0
    resumed = json.loads((out / "checkpoints" / "step-000003" / "config.json").read_text())
    assert resumed["config"]["arithmetic"] == resumed["train_args"]["arithmetic"] == "tutorial"


def test_an_empty_sample_prompt_samples_from_endoftext_and_the_run_ends_with_its_checkpoint(corpus, tmp_path):
    """`--sample-prompt ""` (as Hugging Face's generate() without inputs) used to crash the
    end-of-run sample before the final checkpoint was written."""
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "3", "--sample-prompt", "")) == 0
    (ckpt,) = (out / "checkpoints").iterdir()
    assert ckpt.name == "step-000003"
    samples = [m["text"] for m in read_metrics(out / "metrics.jsonl") if m["event"] == "sample"]
    assert len(samples) == 1 and samples[0].startswith("<|endoftext|>") and len(samples[0]) > len("<|endoftext|>")


def test_a_failing_sample_never_costs_a_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    def broken(self, model, device):
        raise TypeError("the sampler broke")

    monkeypatch.setattr(LanguageModelTask, "end_of_epoch", broken)
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "3")) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    err = capsys.readouterr().err
    assert "warning: the sample at step 3 failed (TypeError: the sampler broke); training goes on" in err


def test_training_without_validation(corpus, tmp_path, monkeypatch, capsys):
    """No validation set (what `--val-ratio 0` gives): training losses only, in the metrics, the
    final line and the plot; checkpoints are still rotated and pruned."""
    import minigpt.cli.train as train_cli

    real = train_cli.load_splits
    monkeypatch.setattr(train_cli, "load_splits", lambda *a: (real(*a)[0], None))
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "6", "--save-interval", "2", "--keep-last", "1")) == 0
    printed = capsys.readouterr()
    assert "final: train loss" in printed.out and "no validation" in printed.out and "val loss" not in printed.out
    assert "/ no val windows" in printed.err
    evals = [m for m in read_metrics(out / "metrics.jsonl") if m["event"] == "eval"]
    assert evals and all("train_loss" in m and not any(k.startswith("val_") for k in m) for m in evals)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000006"]
    assert (out / "loss-plot.png").stat().st_size > 1000
    assert main(["--resume", "latest", "--out-dir", str(out), "--max-steps", "8", "--no-progress"]) == 0


def test_log_interval_and_eval_iters_all_through_the_command(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_args(corpus, out, "--max-steps", "7", "--log-interval", "3", "--eval-iters", "all",
                          "--eval-interval", "0", "--lr-schedule", "linear", "--warmup-ratio", "0.2")) == 0
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics if m["event"] == "step"] == [3, 6, 7]
    assert [m["lr"] for m in metrics if m["event"] == "step"] == [lr_at(s, TrainConfig(lr=5e-4, lr_schedule="linear",
                                                                                       warmup_ratio=0.2), 7)
                                                                  for s in (2, 5, 6)]
