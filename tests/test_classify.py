import contextlib
import csv
import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt import GPTModel, get_preset
from minigpt.checkpoint import save_model
from minigpt.weights import load_classifier
from minigpt.finetune import freeze
from minigpt.classifier import (GPTClassifier, encode_texts, evaluate_dataset, make_dataset, predict,
                                read_examples, sort_labels)
from minigpt.cli.classify import main, resolve_checkpoint
from minigpt.errors import DataError

WORDS = "the a cat dog sat on mat ran past every effort moves you while house tree green small big slowly".split()


pytestmark = pytest.mark.usefixtures("one_thread")


def marker_texts(n: int, seed: int) -> list[tuple[str, str]]:
    """Random word salads; every other one has "banana" somewhere and is labelled pos."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        if i % 2 == 0:
            words.insert(rng.randint(0, len(words)), "banana")
        rows.append((" ".join(words), "pos" if i % 2 == 0 else "neg"))
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


TINY_TRAIN = ["--preset", "tiny", "--trainable-blocks", "2", "--lr", "2e-3", "--warmup-steps", "5", "--min-lr", "1e-4",
              "--batch-size", "16", "--eval-interval", "10", "--eval-iters", "3", "--no-progress", "--seed", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """A tiny random-init GPT fine-tuned to spot the marker word: the run directory and its stdout."""
    root = tmp_path_factory.mktemp("classify")
    data = write_csv(root / "data.csv", marker_texts(400, seed=0))
    code, out, err = run(["train", "--data", str(data), "--out-dir", str(root / "run"), "--epochs", "5",
                          *TINY_TRAIN])
    assert code == 0, err
    return root / "run", out


def test_tiny_model_learns_the_marker_word_well_above_chance(trained):
    run_dir, out = trained
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["event"] == "eval"]
    assert evals[0]["val_accuracy"] < 0.7  # chance at the start...
    (report,) = [m for m in metrics if m["event"] == "report"]
    for split in ("val", "test"):  # ...and well above it after 5 epochs (a few seconds)
        assert report[split]["accuracy"] >= 0.85, report[split]
        for label in ("neg", "pos"):
            assert report[split]["classes"][label]["precision"] >= 0.75
            assert report[split]["classes"][label]["recall"] >= 0.75
    assert report["train"]["examples"] + report["val"]["examples"] + report["test"]["examples"] == 400
    assert report["val"]["examples"] == 40 and report["test"]["examples"] == 80  # 10% / 20%
    assert "test: 80 examples, loss" in out and "precision" in out and "recall" in out
    assert (run_dir / "accuracy-loss-plot.png").stat().st_size > 1000
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    config = json.loads((ckpt / "config.json").read_text())
    assert config["train_args"]["labels"] == ["neg", "pos"]
    assert config["train_args"]["max_length"] == 14  # the longest training text in tokens
    assert load_file(ckpt / "model.safetensors")["out_head.weight"].shape == (2, 64)


def test_evaluate_and_predict_from_the_checkpoint(trained, tmp_path, tokenizer):
    run_dir, _ = trained
    test_file = write_csv(tmp_path / "fresh.csv", marker_texts(60, seed=99))
    code, out, err = run(["evaluate", "--checkpoint", str(run_dir), "--data", str(test_file)])
    assert code == 0, err
    assert "fresh.csv: 60 examples (neg 30 = 50.0%, pos 30 = 50.0%)" in err
    accuracy = float(out.split("accuracy ")[1].split("%")[0])
    assert accuracy >= 85.0

    model = load_classifier(resolve_checkpoint(run_dir))
    texts = ["the cat sat banana on the mat", "the cat sat on the mat", "every effort moves you"]
    expected = predict(model, texts, tokenizer)
    assert [label for label, _ in expected] == ["pos", "neg", "neg"]
    inputs = tmp_path / "texts.txt"
    inputs.write_text("\n".join([texts[0], "", *texts[1:]]) + "\n")  # a blank line is skipped
    code, out, err = run(["predict", "--checkpoint", str(run_dir), "--input", str(inputs)])
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(label, text) for label, _, text in lines] == [(label, t) for (label, _), t in zip(expected, texts,
                                                                                                   strict=True)]
    for (_, p, _), (_, q) in zip(lines, expected, strict=True):
        assert 0.5 < float(p) <= 1.0 and float(p) == pytest.approx(q, abs=1e-4)


def test_unseen_label_at_evaluation_is_a_clear_error(trained, tmp_path):
    run_dir, _ = trained
    bad = write_csv(tmp_path / "bad.csv", [("a cat banana", "pos"), ("a dog", "maybe")])
    code, out, err = run(["evaluate", "--checkpoint", str(run_dir), "--data", str(bad)])
    assert code == 2 and out == ""
    assert err == f"error: {bad}: line 3: unknown label 'maybe'; the classifier's labels are: neg, pos\n"


def test_padding_does_not_change_the_prediction(tiny_cfg):
    model = GPTClassifier(tiny_cfg, ["a", "b", "c"]).eval()
    text = torch.randint(0, 100, (1, 7))
    alone = model(text)
    for pad_id in (0, 99):
        ids, lengths = encode_texts([text[0].tolist()], max_length=16, pad_id=pad_id)
        torch.testing.assert_close(model(ids, lengths), alone)
    # The tutorial reads the last position, which is padding here: a different answer.
    assert not torch.allclose(model(ids), alone)
    # In a batch with texts of other lengths, each row gets what it gets alone.
    others = [torch.randint(0, 100, (n,)).tolist() for n in (3, 16, 1)]
    ids, lengths = encode_texts([text[0].tolist(), *others], max_length=16, pad_id=0)
    batched = model(ids, lengths)
    torch.testing.assert_close(batched[:1], alone)
    for i, other in enumerate(others, 1):
        torch.testing.assert_close(batched[i:i + 1], model(torch.tensor([other])))


def test_from_gpt_copies_the_body_and_freeze_trains_only_the_top(tiny_cfg):
    base = GPTModel(tiny_cfg.replace(tie_weights=True))
    model = GPTClassifier.from_gpt(base, ["x", "y"])
    assert model.out_head.weight.shape == (2, 32) and model.out_head.weight is not model.tok_emb.weight
    assert not model.cfg.tie_weights and model.max_length == tiny_cfg.context_length
    for name, tensor in base.state_dict().items():
        if not name.startswith("out_head."):
            assert torch.equal(model.state_dict()[name], tensor), name

    def trainable() -> set[str]:
        return {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("trf") else "")
                for n, p in model.named_parameters() if p.requires_grad}

    n = freeze(model, 1)
    assert trainable() == {"trf_blocks.1", "final_norm", "out_head"}
    assert n == sum(p.numel() for p in (*model.trf_blocks[1].parameters(), *model.final_norm.parameters(),
                                        *model.out_head.parameters()))
    freeze(model, 0)
    assert trainable() == {"final_norm", "out_head"}
    assert freeze(model, None) == model.num_parameters()
    with pytest.raises(ValueError, match=r"--trainable-blocks must be in \[0, 2\]"):
        freeze(model, 3)


def test_init_from_our_checkpoint_freezes_the_body_and_resumes_exactly(tmp_path):
    """Fine-tune a saved pretraining model with one trainable block; a run stopped at step 3
    and resumed ends with the same weights as one that was not stopped."""
    base = GPTModel(get_preset("tiny", tie_weights=True))
    save_model(base, tmp_path / "pretrained")
    data = write_csv(tmp_path / "data.csv", marker_texts(80, seed=1))
    common = ["--init-from", str(tmp_path / "pretrained"), "--data", str(data), "--max-steps", "6",
              "--save-interval", "3", "--keep-last", "5", "--drop-rate", "0.1", "--batch-size", "8", "--lr", "1e-3",
              "--eval-interval", "0", "--no-progress"]
    code, _, err = run(["train", *common, "--out-dir", str(tmp_path / "a")])
    assert code == 0, err
    final = load_file(tmp_path / "a" / "checkpoints" / "step-000006" / "model.safetensors")
    body = base.state_dict()
    assert torch.equal(final["tok_emb.weight"], body["tok_emb.weight"])
    assert torch.equal(final["trf_blocks.0.att.W_query.weight"], body["trf_blocks.0.att.W_query.weight"])
    assert not torch.equal(final["trf_blocks.1.att.W_query.weight"], body["trf_blocks.1.att.W_query.weight"])

    b = tmp_path / "b" / "checkpoints"
    b.mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000003", b / "step-000003")
    code, _, err = run(["train", "--resume", "latest", "--out-dir", str(tmp_path / "b"), "--no-progress"])
    assert code == 0, err
    resumed = load_file(b / "step-000006" / "model.safetensors")
    for name, tensor in final.items():
        assert torch.equal(resumed[name], tensor), name

    code, _, err = run(["train", "--resume", "latest", "--out-dir", str(tmp_path / "b"), "--trainable-blocks", "2"])
    assert code == 2 and "cannot resume" in err and "--trainable-blocks 2 (checkpoint: 1)" in err


def test_read_examples_csv_and_jsonl(tmp_path):
    # The tutorial's columns (Label, Text), a byte-order mark, integer labels.
    path = tmp_path / "train.csv"
    path.write_text("\ufeffLabel,Text\n1,\"win a prize, now\"\n\n0,see you at 5\n", encoding="utf-8")
    assert read_examples(path) == (["win a prize, now", "see you at 5"], ["1", "0"])
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "y": 10}\n{"text": "b", "y": 2}\n\n{"text": "c", "y": "0"}\n')
    texts, labels = read_examples(jsonl, label_column="y")
    assert texts == ["a", "b", "c"] and sort_labels(labels) == ["0", "2", "10"]  # numeric order
    assert sort_labels(["spam", "ham", "spam"]) == ["ham", "spam"]
    dataset = make_dataset([[5, 6, 7], [8]], ["spam", "ham"], ["ham", "spam"], max_length=2)
    ids, lengths, targets = dataset.tensors
    assert ids.tolist() == [[5, 6], [8, 50256]] and lengths.tolist() == [2, 1] and targets.tolist() == [1, 0]


@pytest.mark.parametrize("content,suffix,kwargs,message", [
    ("text,y\nhi,1\n", ".csv", {}, "no column named 'label'; its columns are: text, y (choose one with "
     "--label-column)"),
    ("text,label\nhi,1\n", ".csv", {"text_column": "body"}, "no column 'body'; its columns are: text, label"),
    ("text,label\nhi\n", ".csv", {}, "line 2 has fewer fields than the header's 2"),
    ("text,label\n  ,1\n", ".csv", {}, "line 2: the text is empty"),
    ('{"text": "hi", "label": true}\n', ".jsonl", {}, "line 1: the label must be a non-empty string or an integer"),
    ('{"text": "hi", "label": 1.5}\n', ".jsonl", {}, "the label must be a non-empty string or an integer, got 1.5"),
    ("[1]\n", ".jsonl", {}, "line 1 is a JSON list, not an object"),
    ("text,label\n", ".csv", {}, "no examples"),
    ("hi", ".txt", {}, "unsupported file type '.txt'"),
])
def test_read_examples_errors(tmp_path, content, suffix, kwargs, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match="^" + str(path).replace("\\", "\\\\") + ": .*") as e:
        read_examples(path, **kwargs)
    assert message in str(e.value)


def test_a_single_label_is_an_error():
    with pytest.raises(DataError, match="single label"):
        sort_labels(["ham", "ham"])


@pytest.fixture
def small_data(tmp_path) -> Path:
    return write_csv(tmp_path / "small.csv", marker_texts(40, seed=2))


@pytest.mark.parametrize("flags,message", [
    ([], "train needs --data"),
    (["--data", "nope.csv"], "nope.csv: no such file"),
    (["--data", "{data}", "--trainable-blocks", "3"], "--trainable-blocks must be in [0, 2] or 'all', got 3"),
    (["--data", "{data}", "--max-length", "100"], "--max-length 100 exceeds the model's context length 64"),
    (["--data", "{data}", "--val-ratio", "0"], "validation data is needed"),
    (["--data", "{data}", "--val-ratio", "0.5", "--test-ratio", "0.5"], "must be in [0, 1) and leave some"),
    (["--data", "{data}", "--lr", "0"], "--lr must be positive, got 0.0"),
    (["--data", "{data}", "--batch-size", "0"], "--batch-size must be positive, got 0"),
])
def test_train_cli_errors(small_data, tmp_path, flags, message):
    flags = [f.replace("{data}", str(small_data)) for f in flags]
    code, out, err = run(["train", "--preset", "tiny", "--out-dir", str(tmp_path / "run"), "--no-progress", *flags])
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_evaluate_and_predict_need_a_classifier_checkpoint(tmp_path, small_data):
    save_model(GPTModel(get_preset("tiny")), tmp_path / "lm")
    code, _, err = run(["evaluate", "--checkpoint", str(tmp_path / "lm"), "--data", str(small_data)])
    assert code == 2 and "not a classifier checkpoint" in err
    code, _, err = run(["predict", "--checkpoint", str(tmp_path / "nothing"), "hello"])
    assert code == 2 and err == f"error: {tmp_path / 'nothing'}: no such checkpoint or run directory\n"


def test_init_from_a_classifier_checkpoint_is_an_error(trained, small_data, tmp_path):
    run_dir, _ = trained
    ckpt = resolve_checkpoint(run_dir)
    code, _, err = run(["train", "--init-from", str(ckpt), "--data", str(small_data), "--out-dir", str(tmp_path)])
    assert code == 2 and err == f"error: --init-from {ckpt} is a classifier checkpoint: continue its run with " \
        "--resume, or start from a language model\n"


def test_predict_without_text_is_an_error(trained, monkeypatch):
    run_dir, _ = trained
    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n"))
    code, _, err = run(["predict", "--checkpoint", str(run_dir)])
    assert code == 2 and "no text to classify" in err


def test_evaluate_dataset_scores(tiny_cfg):
    """Precision and recall from a known confusion: a model that always says class 0."""
    model = GPTClassifier(tiny_cfg.replace(vocab_size=50257), ["a", "b"])  # pads with 50256
    with torch.no_grad():
        model.out_head.weight.zero_()
        model.out_head.bias.copy_(torch.tensor([1.0, 0.0]))
    dataset = make_dataset([[1, 2], [3], [4, 5, 6], [7]], ["a", "a", "a", "b"], ["a", "b"], max_length=3)
    result = evaluate_dataset(model, dataset, batch_size=3)
    assert result["examples"] == 4 and result["accuracy"] == 0.75
    assert result["classes"]["a"] == {"support": 3, "precision": 0.75, "recall": 1.0}
    assert result["classes"]["b"] == {"support": 1, "precision": 0.0, "recall": 0.0}
    expected_loss = torch.nn.functional.cross_entropy(torch.tensor([[1.0, 0.0]] * 4), torch.tensor([0, 0, 0, 1]))
    assert result["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)


def test_lora_classifier_saves_adapters_and_head_and_evaluates_from_its_base(tmp_path):
    base = GPTModel(get_preset("tiny", tie_weights=True))
    save_model(base, tmp_path / "pretrained")
    data = write_csv(tmp_path / "data.csv", marker_texts(80, seed=1))
    code, out, err = run(["train", "--init-from", str(tmp_path / "pretrained"), "--data", str(data),
                          "--max-steps", "4", "--batch-size", "8", "--lr", "1e-3", "--eval-interval", "0",
                          "--no-progress", "--lora-rank", "4", "--lora-targets", "attn",
                          "--out-dir", str(tmp_path / "run")])
    assert code == 0, err
    assert "the last 0 block(s), final norm and head and the LoRA adapters" in err
    ckpt = tmp_path / "run" / "checkpoints" / "step-000004"
    saved = load_file(ckpt / "model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved if k.startswith("trf_blocks.")} == {"lora_A", "lora_B"}
    assert {k for k in saved if not k.startswith("trf_blocks.")} == {
        "out_head.weight", "out_head.bias", "final_norm.scale", "final_norm.shift"}
    code, out, err = run(["evaluate", "--checkpoint", str(ckpt), "--data", str(data)])
    assert code == 0 and "accuracy" in out, err
    code, _, err = run(["train", "--resume", "latest", "--out-dir", str(tmp_path / "run"), "--lora-rank", "8"])
    assert code == 2 and "--lora-rank 8 (checkpoint: 4)" in err
