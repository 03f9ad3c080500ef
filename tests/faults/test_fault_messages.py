"""Each bad input the issue lists is one line naming the file or flag, and nothing is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faultkit import assert_recovers, resume, tiny_args

from minigpt import GPTModel, get_preset
from minigpt.checkpoint import CheckpointError, load_trainer_state, save_model
from minigpt.cli.classify import main as classify_main
from minigpt.cli.train import main
from minigpt.training import list_checkpoints
from minigpt.weights import load_hf, save_hf

ROOT = Path(__file__).resolve().parents[2]


def resume_previous(out: Path) -> int:
    """What a user does when the newest checkpoint is refused: resume from the one before."""
    return main(["--resume", str(out / "checkpoints" / "step-000002"), "--out-dir", str(out), "--max-steps", "3",
                 "--no-progress"])


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_fresh_run_refuses_an_existing_runs_out_dir(corpus, run_copy, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (run_copy / "checkpoints").iterdir()}
    metrics = (run_copy / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(tiny_args(corpus, run_copy, "--max-steps", "2")) == 2
    err = one_line(capsys)
    assert f"holds a run on {corpus}, checkpoints up to step-000004" in err
    assert "--resume latest" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in (run_copy / "checkpoints").iterdir()} == before
    assert (run_copy / "metrics.jsonl").read_text() == metrics
    assert_recovers(run_copy, 5, newest=4)


def test_overwrite_replaces_the_earlier_run(corpus, run_copy):
    assert main(tiny_args(corpus, run_copy, "--max-steps", "1", "--overwrite")) == 0
    assert [p.name for p in list_checkpoints(run_copy)] == ["step-000001"]
    assert_recovers(run_copy, 2, newest=1)


REFUSED = {("--lr", "inf"): "--lr must be a finite number, got inf",
           ("--lr", "nan"): "--lr must be a finite number, got nan",
           ("--grad-clip", "-1"): "--grad-clip must be positive",
           ("--grad-clip", "0"): "--grad-clip must be positive",
           ("--max-bad-steps", "0"): "--max-bad-steps must be positive, got 0",
           ("--weight-decay", "nan"): "--weight-decay must be a finite number"}


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_unusable_numbers_are_refused_up_front(corpus, tmp_path, capsys, flag):
    assert main(tiny_args(corpus, tmp_path / "run", *flag)) == 2
    assert REFUSED[flag] in one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_pickle_payload_in_trainer_pt_is_refused_without_dangerous_advice(run_copy, capsys):
    ckpt = run_copy / "checkpoints" / "step-000004"
    state = load_trainer_state(ckpt)
    torch.save({**state, "extra": Payload()}, ckpt / "trainer.pt")
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("files")  # as a checkpoint written before checksums: only the pickle check is left
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as caught:
        load_trainer_state(ckpt)
    message = str(caught.value)
    assert "trainer.pt: contains code" in message and "was not loaded" in message and "may be malicious" in message
    assert "weights_only" not in message and "safe_globals" not in message and "system" in message
    capsys.readouterr()
    assert resume(run_copy, 5) == 2
    assert "contains code" in one_line(capsys)
    assert resume_previous(run_copy) == 0


def test_a_pickle_payload_in_pytorch_model_bin_is_refused(tmp_path):
    hf = save_hf(GPTModel(get_preset("tiny", n_layers=1, emb_dim=16, n_heads=2)), tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    torch.save({"wte.weight": torch.zeros(2), "x": Payload()}, hf / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: contains code.*may be malicious") as caught:
        load_hf(hf)
    assert "weights_only" not in str(caught.value)


@pytest.mark.parametrize("content,message", [
    ('"hello"', "config.json: unreadable config (the file is a JSON str, not an object)"),
    ("[1, 2]", "config.json: unreadable config (the file is a JSON list, not an object)"),
    ("TRAIN_ARGS", "config.json: unreadable config (train_args is a JSON str, not an object)"),
])
def test_a_config_json_of_the_wrong_shape_is_named(run_copy, capsys, content, message):
    config_file = run_copy / "checkpoints" / "step-000004" / "config.json"
    if content == "TRAIN_ARGS":
        content = json.dumps({**json.loads(config_file.read_text()), "train_args": "lr=1"})
    config_file.write_text(content)
    capsys.readouterr()
    assert resume(run_copy, 5) == 2
    assert message in one_line(capsys)
    assert resume_previous(run_copy) == 0


@pytest.mark.parametrize("text,message", [
    (" \n\t\n   \n", "contains no text (only whitespace)"),
    ("Hello there.", "tokens, fewer than"),
])
def test_an_unusable_corpus_names_its_file(tmp_path, capsys, text, message):
    data = tmp_path / "tiny.txt"
    data.write_text(text)
    assert main(tiny_args(data, tmp_path / "run")) == 2
    err = one_line(capsys)
    assert str(data) in err and message in err


@pytest.mark.parametrize("content,line,message", [
    ('text,label\n"fine",1\n"never closed,1\nmore,0\n', 3, "a quoted field is never closed"),
    ('text,label\n"fine",1\n"closed" then more,1\n', 3, "',' expected after '\"'"),
])
def test_a_malformed_csv_names_the_line(corpus, tmp_path, capsys, content, line, message):
    data = tmp_path / "notes.csv"
    data.write_text(content)
    assert main(tiny_args(data, tmp_path / "run")) == 2
    assert f"{data}: line {line}: {message}" in one_line(capsys)


def test_classify_predict_input_directory_is_one_line(tmp_path, capsys):
    from minigpt.classifier import GPTClassifier

    model = GPTClassifier.from_gpt(GPTModel(get_preset("tiny", n_layers=1, emb_dim=16, n_heads=2)), ["a", "b"], 8)
    save_model(model, tmp_path / "clf", metadata={"train_args": {"labels": ["a", "b"], "max_length": 8}})
    capsys.readouterr()
    assert classify_main(["predict", "--checkpoint", str(tmp_path / "clf"), "--input", str(tmp_path)]) == 2
    assert f"--input {tmp_path} is a directory" in one_line(capsys)


def test_a_metrics_line_cut_short_is_reported_and_dropped(run_copy, capsys):
    lines = (run_copy / "metrics.jsonl").read_text().count("\n")
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"event": "step", "st')  # a full disk cut the last record
    capsys.readouterr()
    assert_recovers(run_copy, 5, newest=4)
    assert f"metrics.jsonl: left out unreadable line(s) {lines + 1} (cut short" in capsys.readouterr().err


def test_the_cli_subprocess_prints_one_line_for_an_existing_run(corpus, run_copy):
    """The whole command, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "minigpt.train", *tiny_args(corpus, run_copy)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "holds a run" in proc.stderr, proc.stderr


def test_classify_train_refuses_an_existing_runs_out_dir_too(run_copy, tmp_path, capsys):
    data = tmp_path / "labelled.csv"
    data.write_text("text,label\nwin a prize,spam\nsee you at 5,ham\n")
    capsys.readouterr()
    assert classify_main(["train", "--data", str(data), "--preset", "tiny", "--out-dir", str(run_copy),
                          "--no-progress"]) == 2
    assert f"--out-dir {run_copy} holds a run" in one_line(capsys)
    assert_recovers(run_copy, 5, newest=4)
