"""Evaluation: sliding-window perplexity and bits per byte, HellaSwag, the `python -m minigpt.eval` command.

The references are computed with Hugging Face's `GPT2LMHeadModel` on the same (random) weights:
the perplexity guide's loop, and build-nanogpt's HellaSwag scoring.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.eval import main as eval_main
from minigpt.evaluation import (HellaSwagChoice, HellaSwagExample, evaluate_perplexity, hellaswag_accuracy,
                                read_hellaswag, score_hellaswag, score_tails, sliding_windows, token_byte_lengths)
from minigpt.errors import ConfigError, DataError, DownloadError
from minigpt.evaluation import hellaswag
from minigpt.tokenizer import EOS_ID
from tests.hf_utils import copy_hf_into_minigpt, random_hf_gpt2
from tests.http_server import serving

CTX = 32


@pytest.fixture(scope="module")
def hf_small():
    """A random HF GPT-2 with a 100-token vocabulary and its minigpt copy."""
    hf = random_hf_gpt2(n_layer=2, n_head=4, n_embd=32, vocab=100, n_positions=CTX, seed=1)
    return hf, copy_hf_into_minigpt(hf)


@pytest.fixture(scope="module")
def hf_gpt2_vocab():
    """A random HF GPT-2 with GPT-2's vocabulary (real tokenized text) and its minigpt copy."""
    hf = random_hf_gpt2(n_layer=2, n_head=4, n_embd=32, vocab=50257, n_positions=64, seed=2)
    return hf, copy_hf_into_minigpt(hf)


def hf_guide_perplexity(model, input_ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The loop of Hugging Face's "Perplexity of fixed-length models" guide: (mean NLL, tokens).

    The guide weights each window's mean loss by its label count minus one (the label shift); the
    loss averages over the labels left after the shift, and that count is used here, so that the
    mean is over every scored token (the two agree when stride == max_length).
    """
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(ids, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("stride", [CTX, 16, 7, 1])
def test_perplexity_equals_the_hf_guides_loop(hf_small, tokenizer, stride):
    hf, model = hf_small
    ids = torch.randint(0, 100, (1, 150), generator=torch.Generator().manual_seed(0))
    want_loss, want_tokens = hf_guide_perplexity(hf, ids, CTX, stride)
    got = evaluate_perplexity(model, ids[0], tokenizer, context_length=CTX, stride=stride, batch_size=3)
    assert got.tokens == want_tokens
    assert got.loss == pytest.approx(want_loss, abs=1e-4)
    assert got.perplexity == pytest.approx(math.exp(want_loss), rel=1e-4)


def test_stride_equal_to_context_gives_disjoint_windows(hf_small, tokenizer):
    assert sliding_windows(100, CTX, CTX) == [(0, 32, 31), (32, 64, 31), (64, 96, 31), (96, 100, 3)]
    hf, model = hf_small
    ids = torch.randint(0, 100, (100,), generator=torch.Generator().manual_seed(1))
    got = evaluate_perplexity(model, ids, tokenizer, context_length=CTX, stride=CTX)
    # Each window alone: the mean loss of HF's model over the four chunks, token-weighted.
    with torch.no_grad():
        nats = sum(float(hf(ids[b:e][None], labels=ids[b:e][None]).loss) * (e - b - 1) for b, e, _ in
                   sliding_windows(100, CTX, CTX))
    assert (got.windows, got.tokens) == (4, 96)
    assert got.nats == pytest.approx(nats, rel=1e-5)


def test_overlapping_windows_score_each_token_once():
    for n, ctx, stride in [(150, 32, 16), (150, 32, 7), (33, 32, 5), (10, 32, 16)]:
        windows = sliding_windows(n, ctx, stride)
        scored = [t for _, end, k in windows for t in range(end - k, end)]
        assert scored == list(range(1, n))
        assert all(end - begin <= ctx for begin, end, _ in windows)


def test_bits_per_byte_by_hand(hf_gpt2_vocab, tokenizer):
    hf, model = hf_gpt2_vocab
    text = "Grüße, naïve café! ✓ 2024"
    ids = [EOS_ID] + tokenizer.encode(text)
    got = evaluate_perplexity(model, ids, tokenizer, context_length=64, stride=64)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1]
    nats = float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
    n_bytes = len(text.encode("utf-8"))
    assert (got.tokens, got.bytes) == (len(ids) - 1, n_bytes)
    assert got.bits_per_byte == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert got.loss == pytest.approx(nats / (len(ids) - 1), rel=1e-5)


def test_token_byte_lengths(tokenizer):
    lengths = token_byte_lengths(tokenizer)
    assert len(lengths) == 50257 and lengths[EOS_ID] == 0
    word = tokenizer.encode(" café")
    assert sum(int(lengths[t]) for t in word) == len(" café".encode())


def test_requests_with_the_same_inputs_share_a_row(hf_small):
    _, model = hf_small
    requests = [([1, 2, 3, 4], 1), ([1, 2, 3, 5], 1), ([1, 2, 3, 4], 3), ([9, 2, 3, 4, 7], 2)]
    together = score_tails(model, requests, batch_size=2)
    for request, got in zip(requests, together, strict=True):
        alone = score_tails(model, [request])[0]
        assert torch.allclose(got.logprobs, alone.logprobs, atol=1e-6) and got.greedy == alone.greedy
    assert together[2].logprobs[-1] == together[0].logprobs[0]


def test_score_tails_checks_its_requests(hf_small):
    _, model = hf_small
    with pytest.raises(ConfigError, match="at least one token of context"):
        score_tails(model, [([1, 2, 3], 3)])
    with pytest.raises(ConfigError, match="truncate it on the left"):
        score_tails(model, [(list(range(CTX + 2)), 1)])


# ---------------------------------------------------------------------------------------------
# HellaSwag

RECORDS = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.",
     "ctx_b": "she", "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady",
     "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the "
                 "barbell.", "stands and lifts the weight over her head."], "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 106, "activity_label": "Canoeing", "ctx_a": "Two women in a child are shown in a canoe while a man "
     "pulls the canoe while standing in the water, with other individuals visible in the background.",
     "ctx_b": "the child and a different man", "split": "val", "split_type": "indomain", "label": 2,
     "ctx": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, "
            "with other individuals visible in the background. the child and a different man",
     "endings": ["are then shown paddling down a river in a boat while a woman talks.",
                 "are driving the canoe, they go down the river flowing side to side.",
                 "sit in a canoe while the man paddles.", "walking go down the rapids, while the man in his "
                 "helicopter almost falls and goes out of canoehood."], "source_id": "activitynet~v_-xQvJmC2jhk"},
]


@pytest.fixture
def hellaswag_file(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def nanogpt_choice(hf, tokenizer, example: HellaSwagExample) -> tuple[int, int]:
    """build-nanogpt's hellaswag.py scoring on the HF model: (pred, pred_norm)."""
    ctx = tokenizer.encode(example.context)
    rows = [ctx + tokenizer.encode(" " + e) for e in example.endings]
    width = max(map(len, rows))
    tokens = torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros(4, width)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(ctx):len(row)] = 1
    with torch.no_grad():
        logits = hf(tokens).logits
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(4, -1)
    masked = losses * mask[:, 1:]
    sum_loss = masked.sum(dim=1)
    avg_loss = sum_loss / mask[:, 1:].sum(dim=1)
    return int(sum_loss.argmin()), int(avg_loss.argmin())


def test_hellaswag_choices_equal_the_hf_models(hf_gpt2_vocab, tokenizer, hellaswag_file):
    hf, model = hf_gpt2_vocab
    examples = read_hellaswag(hellaswag_file)
    assert [ex.label for ex in examples] == [3, 3, 2] and examples[0].endings[1] == "is ripping level tiles off."
    choices = score_hellaswag(model, examples, tokenizer, batch_size=2)
    assert [(c.pred, c.pred_norm) for c in choices] == [nanogpt_choice(hf, tokenizer, ex) for ex in examples]
    # The sums and means are of the ending's tokens: check one against the HF model directly.
    ctx, ending = tokenizer.encode(examples[0].context), tokenizer.encode(" " + examples[0].endings[2])
    with torch.no_grad():
        logp = hf(torch.tensor([ctx + ending])).logits[0].log_softmax(-1)
    want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(ending))
    assert choices[0].sums[2] == pytest.approx(want, abs=1e-4)
    assert choices[0].means[2] == pytest.approx(want / len(ending), abs=1e-4)


def test_accuracy_by_hand():
    choices = [HellaSwagChoice(label=0, pred=0, pred_norm=1, sums=(-3.0, -4.0), means=(-1.5, -1.0)),
               HellaSwagChoice(label=1, pred=0, pred_norm=1, sums=(-2.0, -6.0), means=(-2.0, -1.5)),
               HellaSwagChoice(label=1, pred=1, pred_norm=1, sums=(-5.0, -1.0), means=(-5.0, -0.5))]
    want = {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(2 / 3), "examples": 3}
    assert hellaswag_accuracy(choices) == want


def test_hellaswag_data_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ctx": "x", "endings": ["a", "b"], "label": 0}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1: a HellaSwag record has a text ctx and 4 text endings"):
        read_hellaswag(bad)
    bad.write_text(json.dumps({"ctx": "x", "label": 0}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="not a HellaSwag record"):
        read_hellaswag(bad)


def test_hellaswag_download_is_checked_by_its_example_count(tmp_path, monkeypatch):
    lines = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    with serving({"/data/hellaswag_val.jsonl": lines, "/data/hellaswag_train.jsonl": lines}) as srv:
        monkeypatch.setattr(hellaswag, "BASE_URL", srv.url + "/data/")
        monkeypatch.setattr(hellaswag, "SPLIT_EXAMPLES", {"val": 3, "train": 5})
        path = hellaswag.hellaswag_file("val", tmp_path)
        assert path == tmp_path / "hellaswag_val.jsonl" and path.read_bytes() == lines
        assert hellaswag.hellaswag_file("val", tmp_path) == path and len(srv.requests) == 1  # kept, not fetched
        with pytest.raises(DownloadError, match="got 3 examples, expected 5; it was not kept"):
            hellaswag.hellaswag_file("train", tmp_path)
    assert not (tmp_path / "hellaswag_train.jsonl").exists()
    with pytest.raises(DataError, match="the test split has no labels"):
        hellaswag.hellaswag_file("test", tmp_path)


# ---------------------------------------------------------------------------------------------
# The command


def test_eval_command_perplexity_and_hellaswag(tmp_path, hellaswag_file, capsys):
    text = tmp_path / "held-out.txt"
    text.write_text("Every effort moves you. " * 30, encoding="utf-8")
    model = ["--preset", "tiny", "--seed", "0", "--device", "cpu"]
    assert eval_main(["perplexity", *model, "--data", str(text), "--stride", "48", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes"] == len(text.read_bytes()) and result["stride"] == 48 and result["context_length"] == 64
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert eval_main(["perplexity", *model, "--data", str(text), "--stride", "48", "--json", "--no-progress",
                      "--dtype", "bfloat16"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(result["loss"], rel=0.02)
    assert eval_main(["perplexity", *model, "--data", str(text), "--split", "val", "--val-ratio", "0.5",
                      "--json", "--no-progress"]) == 0
    held_out = json.loads(capsys.readouterr().out)
    assert held_out["split"] == "val" and held_out["tokens"] < result["tokens"]
    assert eval_main(["hellaswag", *model, "--data", str(hellaswag_file), "--limit", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 examples" in out and "acc_norm" in out


def test_eval_command_user_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert eval_main(["perplexity", "--preset", "tiny", "--data", str(missing)]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    assert eval_main(["perplexity", "--preset", "tiny", "--data", "the-verdict", "--stride", "100"]) == 2
    assert "stride must be in [1, context length 64]" in capsys.readouterr().err
