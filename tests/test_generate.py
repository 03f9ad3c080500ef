import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import EOS_ID, GPTConfig, GPTModel, KVCache
from minigpt.backends import optimize_for_cpu
from minigpt.book import (
    generate_greedy_text,
    generate_next_greedy_token,
    generate_text_simple,
    print_sampled_tokens,
    softmax_with_temperature,
)
from minigpt.checkpoint import save_model
from minigpt.cli.generate import main
from minigpt.generation import (
    SamplingConfig,
    decode_pieces,
    filter_logits,
    generate,
    generate_tokens,
    sample_next_token,
    stream,
)
from tests.hf_utils import copy_hf_into_minigpt, random_hf_gpt2

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_gpt2()  # 2 layers, 4 heads, 32 dims, vocab 100, 32 positions


@pytest.fixture(scope="module")
def model(hf_model):
    return copy_hf_into_minigpt(hf_model)


def greedy_reference(model, idx, max_new_tokens, context_size):
    """The tutorial's loop, spelled out: crop, full forward, argmax, append."""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


# --- Hugging Face parity --------------------------------------------------------------------


def test_copied_weights_give_hf_logits(hf_model, model):
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_tokens_equal_hf_generate(hf_model, model, use_cache):
    idx = torch.randint(0, 100, (2, 8))
    expected = hf_model.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                 max_new_tokens=20, min_new_tokens=20, pad_token_id=99)
    out = generate(model, idx, 20, 32, use_cache=use_cache)
    assert len(set(out[:, 8:].flatten().tolist())) > 5  # a run that visits many tokens
    assert torch.equal(out, expected)


def test_ragged_batch_equals_hf_left_padded_generate(hf_model, model):
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[99] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    expected = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                                 min_new_tokens=20, pad_token_id=99)[:, width:].tolist()
    out = generate(model, PROMPTS, 20)
    assert [row[len(p):] for row, p in zip(out, PROMPTS, strict=True)] == expected


# --- KV cache and padding in the model ---------------------------------------------------------


@pytest.mark.parametrize("arithmetic", ["fast", "tutorial"])
def test_cached_logits_match_full_forward(hf_model, arithmetic):
    model = copy_hf_into_minigpt(hf_model, arithmetic=arithmetic)
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.cfg, 2, 20)
        steps = [model(idx[:, :5], cache)] + [model(idx[:, i:i + 1], cache) for i in range(5, 20)]
        assert cache.length == 20
        last = model(idx, last_only=True)
    # One row at a time sums in another order than the full product (MKL on AMD CPUs: ~2e-5).
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=5e-5)
    assert last.shape == (2, 1, 100)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arithmetic", ["fast", "tutorial"])
def test_left_padded_rows_get_their_own_logits(hf_model, arithmetic):
    model = copy_hf_into_minigpt(hf_model, arithmetic=arithmetic)
    rows = [torch.randint(0, 100, (n,)) for n in (9, 4, 1)]
    padded = torch.stack([torch.cat([torch.full((9 - len(r),), 7), r]) for r in rows])
    left_pad = torch.tensor([0, 5, 8])
    with torch.no_grad():
        out = model(padded, left_pad=left_pad)
        assert torch.isfinite(out).all()  # padding queries must not produce NaN
        for i, r in enumerate(rows):
            torch.testing.assert_close(out[i, 9 - len(r):], model(r[None])[0], rtol=1e-5, atol=1e-5)
        # ... and the same through the cache, one token at a time after a prefill.
        cache = KVCache(model.cfg, 3)
        model(padded, cache, left_pad)
        nxt = torch.tensor([[3], [4], [5]])
        step = model(nxt, cache, left_pad)[:, -1]
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, nxt[i]])[None])[0, -1]
            torch.testing.assert_close(step[i], alone, rtol=1e-5, atol=1e-5)


# --- greedy decoding: cache, context, batches ----------------------------------------------------


@pytest.mark.parametrize("context_size, new", [(32, 10), (32, 40), (16, 30), (5, 12)])
def test_cache_and_no_cache_give_the_tutorial_tokens(model, context_size, new):
    idx = torch.tensor([[5, 17, 42, 8], [60, 2, 2, 91]])
    expected = greedy_reference(model, idx, new, context_size)
    assert torch.equal(generate(model, idx, new, context_size, use_cache=False), expected)
    assert torch.equal(generate(model, idx, new, context_size, use_cache=True), expected)
    assert torch.equal(generate_text_simple(model, idx, new, context_size), expected)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("context_size", [32, 6])  # 6: the window slides through the padding
@pytest.mark.filterwarnings("ignore:prompt of 7 tokens")
def test_ragged_batch_equals_each_prompt_alone(model, use_cache, context_size):
    out = generate(model, PROMPTS, 30, context_size, use_cache=use_cache)
    for p, row in zip(PROMPTS, out, strict=True):
        alone = greedy_reference(model, torch.tensor([p]), 30, context_size)
        assert row == alone[0].tolist()
    # A list of 1-D tensors works too.
    assert generate(model, [torch.tensor(p) for p in PROMPTS], 30, context_size) == out


def test_long_prompt_is_cropped_with_a_warning(model):
    idx = torch.randint(0, 100, (1, 40))
    with pytest.warns(UserWarning, match="longer than the context"):
        out = generate(model, idx, 5, 32)
    assert torch.equal(out, greedy_reference(model, idx, 5, 32))


def test_zero_new_tokens_returns_the_prompt(model):
    idx = torch.tensor([[1, 2]])
    assert torch.equal(generate(model, idx, 0), idx)
    assert generate(model, [[1], [2, 3]], 0) == [[1], [2, 3]]


def test_inference_mode(model):
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():
        out = generate(model, idx, 20, 16)
    assert torch.equal(out, greedy_reference(model, idx, 20, 16))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_bfloat16(hf_model, device):
    model32 = copy_hf_into_minigpt(hf_model).to(device)
    model16 = copy_hf_into_minigpt(hf_model).to(device=device, dtype=torch.bfloat16)
    idx = torch.tensor([[1, 2, 3, 4, 5]], device=device)
    with torch.no_grad():
        logits16, logits32 = model16(idx, last_only=True).float(), model32(idx, last_only=True)
    assert (logits16 - logits32).norm() < 0.1 * logits32.norm()  # bfloat16 keeps ~3 digits
    cached = generate(model16, idx, 20, use_cache=True)
    assert torch.equal(cached, generate(model16, idx, 20, use_cache=False))
    assert cached.dtype == torch.long and cached.shape == (1, 25)


@pytest.mark.parametrize("batch", [1, 4])  # float32: plain weights for 1 row, reordered ones for 4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backend_decodes_the_plain_tokens_and_the_model_trains_after(hf_model, dtype, batch):
    plain = copy_hf_into_minigpt(hf_model).to(dtype)
    model = optimize_for_cpu(copy_hf_into_minigpt(hf_model).to(dtype))
    idx = torch.randint(0, 100, (batch, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain(idx)
        with model.decoding(batch):
            fast = model(idx)
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-4 if dtype == torch.float32 else 0.05)
    out = generate(model, idx, 20)
    assert torch.equal(out, generate(plain, idx, 20))
    # Nothing stays patched: the model trains as before.
    assert not any("forward" in vars(m) for m in model.modules())
    model(idx).float().sum().backward()
    assert model.out_head.weight.grad is not None


@pytest.mark.parametrize("device", [CUDA])
def test_cuda_cache_matches_no_cache(hf_model, device):
    model = copy_hf_into_minigpt(hf_model).to(device)
    out = generate(model, PROMPTS, 30, 16)
    assert out == generate(model, PROMPTS, 30, 16, use_cache=False)
    assert out == generate(model.cpu(), PROMPTS, 30, 16)


# --- EOS ----------------------------------------------------------------------------------------


def test_eos_stops_each_row_and_pads_with_eos(model):
    idx = torch.tensor([[5, 17, 42, 8], [60, 2, 2, 91]])
    free = generate(model, idx, 20)[:, 4:].tolist()
    # An EOS that row 0 reaches before row 1 does (or that row 1 never produces).
    first = [{t: row.index(t) for t in row} for row in free]
    eos = next(t for t, i in first[0].items() if i >= 2 and first[1].get(t, 99) > i + 2)
    stop = [first[r].get(eos) for r in range(2)]

    out = generate(model, idx, 20, eos_id=eos)
    width = 20 if stop[1] is None else max(stop)  # the all-EOS step is not appended
    assert out.shape == (2, 4 + width)
    assert out[0, 4:].tolist() == free[0][:stop[0]] + [eos] * (width - stop[0])
    assert out[1, 4:].tolist() == free[1][:width]  # row 1 goes on, unaffected

    lists = generate(model, idx.tolist(), 20, eos_id=eos)
    for r in range(2):
        new = free[r] if stop[r] is None else free[r][:stop[r]]
        assert lists[r] == idx[r].tolist() + new
    # At batch size 1 the EOS itself is not returned, as in the tutorial.
    assert generate(model, idx[:1], 20, eos_id=eos)[0, 4:].tolist() == free[0][:stop[0]]
    # Streaming stops there too.
    assert [t.item() for t in generate_tokens(model, idx[:1], 20, eos_id=eos)] == free[0][:stop[0]]


def test_eos_in_the_prompt_does_not_stop_generation(model):
    free = generate(model, [[9, 9]], 10)[0][2:]
    expected = free[:free.index(9)] if 9 in free else free
    assert len(expected) >= 2
    assert generate(model, [[9, 9]], 10, eos_id=9)[0] == [9, 9] + expected


# --- filtering and sampling on hand-made logits ---------------------------------------------------


def probs_after(logits, **kw):
    return torch.softmax(filter_logits(torch.tensor(logits).log() if kw.pop("from_probs", False)
                                       else torch.tensor(logits), **kw), dim=-1)


def test_top_k_keeps_the_k_largest_per_row():
    out = probs_after([[1.0, 3.0, 2.0, 0.0], [4.0, 0.0, 1.0, 5.0]], top_k=2)
    e = math.e
    torch.testing.assert_close(out, torch.tensor([[0, e / (e + 1), 1 / (e + 1), 0],
                                                  [1 / (e + 1), 0, 0, e / (e + 1)]]))


def test_top_k_keeps_ties_with_the_kth_value():
    out = probs_after([[1.0, 2.0, 2.0, 0.0]], top_k=1)
    torch.testing.assert_close(out, torch.tensor([[0, 0.5, 0.5, 0]]))


def test_temperature_scales_logits():
    out = probs_after([[0.0, math.log(2.0)]], temperature=0.5)  # logits become [0, 2 ln 2]
    torch.testing.assert_close(out, torch.tensor([[0.2, 0.8]]))


def test_softmax_with_temperature_as_in_the_tutorial():
    logits = torch.tensor([0.0, math.log(2.0)])
    torch.testing.assert_close(softmax_with_temperature(logits, 1.0), torch.tensor([1 / 3, 2 / 3]))
    torch.testing.assert_close(softmax_with_temperature(logits, 0.5), torch.tensor([0.2, 0.8]))  # sharper
    flat = softmax_with_temperature(logits, 5.0)
    assert 0.5 < flat[1] < 2 / 3
    batch = softmax_with_temperature(torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]]), 0.5)  # per row
    torch.testing.assert_close(batch, torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        softmax_with_temperature(logits, 0)


@pytest.mark.parametrize("top_p, expected", [
    (0.45, [1.0, 0, 0, 0]),           # 0.5 alone reaches 0.45
    (0.6, [5 / 9, 2 / 9, 2 / 9, 0]),  # 0.5 + 0.2 reaches 0.6; the tied 0.2 is kept too
    (0.75, [5 / 9, 2 / 9, 2 / 9, 0]),
    (0.95, [0.5, 0.2, 0.2, 0.1]),
    (1.0, [0.5, 0.2, 0.2, 0.1]),
])
def test_top_p_keeps_the_nucleus_and_its_ties(top_p, expected):
    out = probs_after([[0.5, 0.2, 0.2, 0.1]], top_p=top_p, from_probs=True)
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_top_p_comes_after_temperature_and_top_k():
    base = [[0.5, 0.3, 0.2]]
    # At T=1, 0.5 < 0.6 so the nucleus needs two tokens: [0.5, 0.3] renormalised.
    torch.testing.assert_close(probs_after(base, top_p=0.6, from_probs=True),
                               torch.tensor([[0.625, 0.375, 0]]))
    # T=0.5 sharpens to [0.25, 0.09, 0.04] / 0.38: 0.658 alone reaches 0.6.
    torch.testing.assert_close(probs_after(base, temperature=0.5, top_p=0.6, from_probs=True),
                               torch.tensor([[1.0, 0, 0]]))
    # top-k first: of [0.5, 0.3] (renormalised 0.625, 0.375), 0.625 alone reaches 0.6.
    torch.testing.assert_close(probs_after([[0.3, 0.2, 0.5]], top_k=2, top_p=0.6, from_probs=True),
                               torch.tensor([[0, 0, 1.0]]))


def test_greedy_picks_the_lowest_id_among_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0], [3.0, 3.0, 1.0]])
    assert sample_next_token(logits, 0.0, top_k=1, top_p=0.1).flatten().tolist() == [1, 0]


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([0.5, 0.2, 0.2, 0.1]).log().repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, 1.0, top_p=0.6, generator=gen).flatten()
    freq = torch.bincount(draws, minlength=4) / 20000
    assert freq[3] == 0
    torch.testing.assert_close(freq, torch.tensor([5 / 9, 2 / 9, 2 / 9, 0]), rtol=0, atol=0.015)


# --- seeds ------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(model):
    idx = torch.tensor([[5, 17, 42, 8]])
    state = torch.get_rng_state()
    a = generate(model, idx, 30, temperature=1.0, top_k=20, generator=123)
    b = generate(model, idx, 30, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(123))
    c = generate(model, idx, 30, temperature=1.0, top_k=20, generator=123, use_cache=False)
    d = generate(model, idx, 30, temperature=1.0, top_k=20, generator=124)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, d)


def test_without_generator_sampling_follows_the_tutorial_with_the_global_rng(model):
    idx = torch.tensor([[5, 17, 42, 8]])
    torch.manual_seed(123)
    out = generate(model, idx, 15, 32, temperature=1.4, top_k=25)
    # The tutorial's recipe, step by step: top-k on raw logits, temperature, multinomial.
    torch.manual_seed(123)
    ref = idx
    for _ in range(15):
        with torch.no_grad():
            logits = model(ref[:, -32:])[:, -1]
        kth = torch.topk(logits, 25).values[:, -1:]
        logits = torch.where(logits < kth, -torch.inf, logits) / 1.4
        ref = torch.cat([ref, torch.multinomial(torch.softmax(logits, -1), 1)], dim=1)
    assert torch.equal(out, ref)


# --- bad arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=101), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(context_size=33), "context_size"),
])
def test_bad_arguments_raise_clear_errors(model, kwargs, match):
    args = dict(max_new_tokens=5, context_size=16, temperature=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, torch.tensor([[1, 2]]), **args)


@pytest.mark.parametrize("idx", [torch.zeros(1, 0, dtype=torch.long), [[1], []], []])
def test_empty_prompts_are_rejected(model, idx):
    with pytest.raises(ValueError, match="empty|no prompts"):
        generate(model, idx, 5)


def test_token_ids_outside_the_vocabulary_are_rejected(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 100]], 5)


# --- streaming ------------------------------------------------------------------------------------


def test_decode_pieces_handles_characters_split_over_tokens(tokenizer):
    text = "naïve café 😀 — 日本語"
    ids = tokenizer.encode(text)
    pieces = list(decode_pieces(ids, tokenizer))
    assert [t for t, _ in pieces] == ids
    assert "".join(s for _, s in pieces) == text
    assert all("\ufffd" not in s for _, s in pieces)
    # The emoji's 4 bytes come whole, with the token holding its last byte; the
    # token before holds its first bytes (and the space before it).
    emoji = [i for i, (_, s) in enumerate(pieces) if "😀" in s]
    assert len(emoji) == 1 and pieces[emoji[0]][1] == "😀" and pieces[emoji[0] - 1][1] == " "


def test_decode_pieces_truncated_mid_character_matches_decode(tokenizer):
    ids = tokenizer.encode("a 😀")
    cut = ids[:-1]  # ends inside the emoji
    pieces = list(decode_pieces(cut, tokenizer))
    assert [t for t, _ in pieces] == cut
    assert "".join(s for _, s in pieces) == tokenizer.decode(cut)


def test_stream_yields_the_generated_tokens_and_text(tokenizer):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4,
                               n_layers=1, drop_rate=0.0)).eval()
    prompt = "Hello, wörld"
    ids = tokenizer.encode(prompt)
    expected = generate(model, torch.tensor([ids]), 12, temperature=1.0, generator=3)[0, len(ids):].tolist()
    pieces = list(stream(model, tokenizer, prompt, 12, temperature=1.0, generator=3))
    assert [t for t, _ in pieces] == expected
    assert "".join(s for _, s in pieces) == tokenizer.decode(expected)


# --- command line ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, context_length=24, emb_dim=32, n_heads=4, n_layers=1, drop_rate=0.0)
    model = GPTModel(cfg).eval()
    path = save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny")
    return path, model


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_streams_the_greedy_continuation(capsys, checkpoint, tokenizer):
    path, model = checkpoint
    code, out, err = run_cli(capsys, "--checkpoint", path, "--prompt", "Every effort moves you",
                             "--max-new-tokens", 8, "--device", "cpu")
    assert code == 0
    ids = tokenizer.encode("Every effort moves you")
    expected = generate(model, torch.tensor([ids]), 8, eos_id=EOS_ID)[0].tolist()
    assert out == tokenizer.decode(expected) + "\n"
    assert "tokens/s" in err
    code, out_no_cache, _ = run_cli(capsys, "--checkpoint", path, "--prompt", "Every effort moves you",
                                    "--max-new-tokens", 8, "--no-cache")
    assert code == 0 and out_no_cache == out


def test_cli_pretrained_directory(capsys, checkpoint, tmp_path):
    from minigpt.weights import save_hf

    path, model = checkpoint
    args = ["--prompt", "Every effort moves you", "--max-new-tokens", 8]
    hf_dir = save_hf(model, tmp_path / "hf")
    code, out, _ = run_cli(capsys, "--pretrained", hf_dir, *args)
    assert code == 0 and out == run_cli(capsys, "--checkpoint", path, *args)[1]


def test_cli_samples_reproducibly_and_reads_stdin(capsys, monkeypatch, checkpoint):
    path, _ = checkpoint
    args = ["--checkpoint", path, "--max-new-tokens", 6, "--temperature", 1.0, "--top-p", 0.9,
            "--top-k", 50, "--num-samples", 2, "--seed", 7]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there"))
    code, out, _ = run_cli(capsys, *args, "--prompt", "-")
    assert code == 0
    samples = out.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("Hi there") for s in samples)
    assert run_cli(capsys, *args, "--prompt", "Hi there")[1] == out


def test_cli_empty_prompt_starts_from_endoftext(capsys, checkpoint, tokenizer):
    path, model = checkpoint
    code, out, _ = run_cli(capsys, "--checkpoint", path, "--max-new-tokens", 5)
    expected = generate(model, torch.tensor([[EOS_ID]]), 5, eos_id=EOS_ID)[0, 1:].tolist()
    assert code == 0 and out == tokenizer.decode(expected) + "\n"


def test_cli_crops_a_long_prompt_with_a_warning(capsys, checkpoint, tokenizer):
    path, _ = checkpoint
    prompt = " ".join(str(i) for i in range(40))
    code, out, err = run_cli(capsys, "--checkpoint", path, "--prompt", prompt, "--max-new-tokens", 2)
    assert code == 0
    assert "warning:" in err and "last 24" in err
    kept = tokenizer.decode(tokenizer.encode(prompt)[-24:])
    assert out.startswith(kept) and not out.startswith(prompt)


def test_cli_random_preset(capsys):
    code, out, err = run_cli(capsys, "--preset", "tiny", "--seed", 0, "--prompt", "Hi",
                             "--max-new-tokens", 3, "--dtype", "bfloat16")
    assert code == 0 and out.startswith("Hi") and "bfloat16" in err


def one_error_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(("error:", "python -m minigpt.generate: error:")), err
    for needle in needles:
        assert needle in last, last


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "-1"], "temperature"),
    (["--top-k", "0"], "top_k"),
    (["--top-k", "50258"], "top_k"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--max-new-tokens", "-1"], "max_new_tokens"),
    (["--num-samples", "0"], "--num-samples"),
    (["--device", "tpu"], "tpu"),
])
def test_cli_bad_arguments(capsys, checkpoint, args, needle):
    path, _ = checkpoint
    with pytest.raises(SystemExit) as exc:  # argparse errors exit; others return a code
        sys.exit(main(["--checkpoint", str(path), *args]))
    assert exc.value.code != 0
    one_error_line(capsys.readouterr().err, needle)


def test_cli_checkpoint_of_another_shape(capsys, checkpoint, tmp_path):
    path, model = checkpoint
    other = save_model(model, tmp_path / "other")
    meta = json.loads((other / "config.json").read_text())
    meta["config"]["emb_dim"] = 64
    (other / "config.json").write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "--checkpoint", other)
    assert code != 0
    one_error_line(err, "shape")
    code, _, err = run_cli(capsys, "--checkpoint", tmp_path / "missing")
    assert code != 0
    one_error_line(err, "missing")


def test_cli_prompt_outside_a_small_vocabulary(capsys, model, tmp_path):
    path = save_model(model, tmp_path / "vocab100")
    code, _, err = run_cli(capsys, "--checkpoint", path, "--prompt", "Hello world")
    assert code != 0
    one_error_line(err, "vocabulary")


def test_cli_pretrained_without_the_weights_module(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "minigpt.weights", None)  # makes the import fail
    code, _, err = run_cli(capsys, "--pretrained", "gpt2")
    assert code != 0
    one_error_line(err, "minigpt.weights")


def test_python_dash_m_entry_point(checkpoint):
    path, _ = checkpoint
    cmd = [sys.executable, "-m", "minigpt.generate", "--checkpoint", str(path), "--prompt", "Hi",
           "--max-new-tokens", "2"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0 and proc.stdout.startswith("Hi") and "tokens/s" in proc.stderr
    proc = subprocess.run(cmd + ["--top-k", "0"], capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 2
    one_error_line(proc.stderr, "top_k")


# --- the Hugging Face course's greedy helpers ----------------------------------------------


def constant_model(token_id: int, strength: float) -> GPTModel:
    """A GPT-2-vocabulary model that, whatever the text, gives `token_id` the logit
    `strength` and every other token 0: the final norm's output is a constant vector."""
    torch.manual_seed(0)
    cfg = GPTConfig(context_length=16, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0, tie_weights=False)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.final_norm.scale.zero_()
        model.final_norm.shift.fill_(1.0)
        model.out_head.weight.zero_()
        model.out_head.weight[token_id] = strength / cfg.emb_dim
    return model


def test_generate_greedy_text_appends_decoded_greedy_tokens(tokenizer):
    exclamation = tokenizer.encode("!")[0]
    model = constant_model(exclamation, strength=12.0)
    prob, token_id = generate_next_greedy_token("Hello, I'm a language model,", tokenizer, model, "cpu")
    assert token_id.item() == exclamation
    # rel 1e-3: torch's float32 CPU softmax uses a fast exp (off by 2.6e-4 here on AVX2)
    assert prob.item() == pytest.approx(math.exp(12) / (math.exp(12) + model.cfg.vocab_size - 1), rel=1e-3)
    # Re-encoded at every step: the text outgrows the 16-token context and is cropped.
    text = generate_greedy_text("Hello, I'm a language model,", tokenizer, model, max_length=30)
    assert text == "Hello, I'm a language model," + "!" * 30


def test_generate_next_greedy_token_is_generates_first_token(tokenizer):
    torch.manual_seed(1)
    model = GPTModel(GPTConfig(context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)).eval()
    text = "Every effort moves you"
    prob, token_id = generate_next_greedy_token(text, tokenizer, model)
    ids = torch.tensor([tokenizer.encode(text)])
    assert token_id.item() == generate(model, ids, 1)[0, -1].item()
    with torch.no_grad():
        assert prob.item() == pytest.approx(torch.softmax(model(ids)[0, -1], -1).max().item())
    # An empty text starts from <|endoftext|>, as GPT-2 does.
    assert generate_next_greedy_token("", tokenizer, model) == generate_next_greedy_token("<|endoftext|>",
                                                                                          tokenizer, model)


def test_print_sampled_tokens_prints_the_documents_counts(capsys):
    # Seed document 003, section 6.3.1: the toy vocabulary, its logits, temperatures 1, 0.1, 5.
    words = ["closer", "every", "effort", "forward", "inches", "moves", "pizza", "toward", "you"]
    logits = torch.tensor([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])
    inverse_vocab = dict(enumerate(words))
    document = {
        1: [73, 0, 0, 582, 2, 0, 0, 343],  # no "you" line: bincount stops at the largest id drawn
        0.1: [0, 0, 0, 985, 0, 0, 0, 15],
        5: [165, 75, 42, 239, 71, 46, 32, 227, 103],
    }
    for temperature, counts in document.items():
        got = print_sampled_tokens(softmax_with_temperature(logits, temperature), inverse_vocab)
        assert got.tolist() == counts
        lines = [f"{c} x {w}" for c, w in zip(counts, words[:len(counts)], strict=True)]
        assert capsys.readouterr().out.splitlines() == lines
    print_sampled_tokens(torch.tensor([0.0, 1.0]), num_samples=5)  # no vocabulary: the ids
    assert capsys.readouterr().out.splitlines() == ["0 x 0", "5 x 1"]


# --- the options as one SamplingConfig, and the package's names -------------------------------------


def test_sampling_config_gives_the_keyword_arguments_tokens(model):
    idx = torch.tensor([[5, 17, 42, 8]])
    sampling = SamplingConfig(temperature=1.0, top_k=20, generator=123)
    steps = torch.stack(list(generate_tokens(model, idx, 10, sampling=sampling)), dim=1)
    assert torch.equal(steps, generate(model, idx, 10, temperature=1.0, top_k=20, generator=123)[:, 4:])
    assert sampling.generator == 123  # the caller's config is left as it was
    greedy = list(generate_tokens(model, idx, 5, sampling=sampling, temperature=0.0))  # options override it
    assert torch.equal(torch.stack(greedy, dim=1), generate(model, idx, 5)[:, 4:])


@pytest.mark.parametrize("module", ["minigpt.cli.generate", "minigpt.generation", "minigpt.classifier",
                                    "minigpt.inspection"])
def test_from_minigpt_import_generate_gives_the_function(module):
    code = (f"import importlib; importlib.import_module({module!r}); from minigpt import generate; "
            "print(callable(generate) and generate.__module__)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "minigpt.generation"


def test_cli_top_k_without_temperature_samples_and_greedy_with_them_is_refused(tmp_path, capsys):
    from minigpt.cli.generate import main

    base = ["--preset", "tiny", "--prompt", "Hello", "--max-new-tokens", "8", "--device", "cpu", "--seed", "1"]
    outputs = []
    for extra in ([], ["--top-k", "50"], ["--top-k", "50", "--temperature", "1"]):
        assert main([*base, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    greedy, sampled, sampled_t1 = outputs
    assert sampled == sampled_t1 and sampled != greedy  # temperature 1 by default, not silently greedy
    assert main([*base, "--top-p", "0.9", "--temperature", "0"]) == 2
    assert "--temperature 0 is greedy and would ignore them" in capsys.readouterr().err
