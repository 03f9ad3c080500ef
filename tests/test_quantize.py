"""Weight-only int8 / bfloat16 inference (`minigpt.backends.quantize`) and its command flags."""

import copy
import json

import pytest
import torch
from torch import nn

from minigpt.backends import optimize_for_cpu
from minigpt.backends import quantize as q
from minigpt.checkpoint import save_model
from minigpt.cli.common import add_model_source, load_model_from_args
from minigpt.cli.eval import main as eval_main
from minigpt.cli.generate import main as generate_main
from minigpt.cli.serve import build_parser as serve_parser
from minigpt.config import GPTConfig
from minigpt.errors import ConfigError
from minigpt.generation import generate
from minigpt.model import GPTModel

FORMATS = ["int8", "bfloat16"]
# Relative error of logits (max |diff| / max |ref|) expected from each format's rounding.
LOGIT_RTOL = {"int8": 0.03, "bfloat16": 0.02}


def _cfg(**changes) -> GPTConfig:
    return GPTConfig(vocab_size=120, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                     qkv_bias=True, **changes)


@pytest.fixture(scope="module")
def trained():
    """A model trained for a few seconds on a repeating sequence: confident, so greedy is stable."""
    torch.manual_seed(0)
    model = optimize_for_cpu(GPTModel(_cfg(tie_weights=True)))
    data = torch.arange(400) * 7 % 120
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, 400 - 33, (8,), generator=gen)
        xy = torch.stack([data[s:s + 33] for s in starts])
        loss = model(xy[:, :-1], targets=xy[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 2.0
    return model.eval()


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 40])  # the direct kernels for a few rows, dequantized tiles for many
def test_quantized_linear_is_close_to_float32(fmt, rows):
    linear = nn.Linear(64, 200)
    layer = q.QuantizedLinear(linear, fmt)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        assert _rel(layer(x), linear(x)) < LOGIT_RTOL[fmt] / 2
        torch.testing.assert_close(layer.dequantized(), linear.weight, rtol=0, atol=linear.weight.abs().max() / 100)
    assert layer.weight.dtype == (torch.int8 if fmt == "int8" else torch.bfloat16)


def test_int8_scales_are_per_output_channel_and_symmetric():
    w = torch.randn(5, 16) * torch.tensor([1e-3, 1, 10, 100, 0])[:, None]  # a zero row must not divide by 0
    qw, scale = q.quantize_int8(w)
    assert qw.dtype == torch.int8 and scale.shape == (5,)
    assert qw[:4].abs().amax(1).tolist() == [127] * 4 and (qw[4] == 0).all()
    torch.testing.assert_close(qw.float() * scale[:, None], w, rtol=0, atol=(scale[:, None] / 2 + 1e-12).max())


@pytest.mark.parametrize("fmt", FORMATS)
def test_fallback_without_the_int8_kernel_gives_the_same_function(monkeypatch, fmt):
    layer = q.QuantizedLinear(nn.Linear(24, 40), fmt)
    x = torch.randn(2, 24)
    with torch.no_grad():
        direct = layer(x)
        monkeypatch.setattr(q, "FEW_ROWS", 0)  # every product through the dequantized tiles
        tiled = layer(x)
    assert _rel(direct, tiled) < 0.01


def test_int8_kernel_needs_an_input_width_of_whole_blocks():
    odd = q.QuantizedLinear(nn.Linear(20, 7), "int8")  # the kernel reads blocks of 8: tiles are used
    assert not odd._direct_kernel()
    with torch.no_grad():
        assert odd(torch.randn(1, 20)).shape == (1, 7)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tie_weights", [True, False])
def test_quantized_model_logits_and_footprint(trained, fmt, tie_weights):
    model = copy.deepcopy(trained)
    if not tie_weights:
        model.out_head.weight = nn.Parameter(model.out_head.weight.detach().clone())
    idx = torch.randint(0, 120, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_last = model(idx), model(idx[:1, :5])
        quantized = q.quantize_weights(model, fmt)
        assert quantized is model and q.weight_format(model) == fmt
        assert _rel(model(idx), ref) < LOGIT_RTOL[fmt]  # many rows: dequantized tiles
        assert _rel(model(idx[:1, :5]), ref_last) < LOGIT_RTOL[fmt]  # few rows: the direct kernels
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [] and len([m for m in model.modules() if isinstance(m, q.QuantizedLinear)]) == 6 * 2 + 1
    assert model.tok_emb.weight.dtype == torch.float32  # embeddings stay float (a lookup reads one row)
    # The linear weights take a quarter (int8) or half (bfloat16) of their float32 bytes.
    ratio = {"int8": 0.25, "bfloat16": 0.5}[fmt]
    linear_bytes = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                       if k.endswith("weight") and "emb" not in k and "norm" not in k)
    float_bytes = sum(t.numel() * 4 for k, t in trained.state_dict().items()
                      if k.endswith("weight") and "emb" not in k and "norm" not in k)
    if tie_weights:
        float_bytes += trained.out_head.weight.numel() * 4  # the head, shared with the embedding, got its own copy
    assert linear_bytes <= ratio * float_bytes + 4 * 300 * 12  # + the int8 scales
    if not tie_weights:
        assert model.memory_mb() < trained.memory_mb() * (ratio + 0.3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_tokens_mostly_equal_with_cache_and_in_a_batch(trained, fmt):
    prompts = [[int(t) for t in (torch.arange(n) * 7 + 3 * i) % 120] for i, n in enumerate((3, 6, 1, 9, 4, 2))]
    ref = generate(trained, prompts, 20)
    model = q.quantize_weights(copy.deepcopy(trained), fmt)
    cached, alone = generate(model, prompts, 20), [generate(model, [p], 20)[0] for p in prompts]
    no_cache = generate(model, prompts, 20, use_cache=False)
    new = [(r[len(p):], c[len(p):], a[len(p):], n[len(p):])
           for p, r, c, a, n in zip(prompts, ref, cached, alone, no_cache, strict=True)]
    same_as_float = sum(x == y for r, c, _, _ in new for x, y in zip(r, c, strict=True)) / (20 * len(prompts))
    assert same_as_float >= 0.9
    assert sum(c == a for _, c, a, _ in new) >= len(prompts) - 1  # a batch row decodes (nearly always) as alone
    assert sum(c == n for _, c, _, n in new) >= len(prompts) - 1  # cache or not: the same tokens
    tensor_out = generate(model, torch.tensor([prompts[1]]), 20, context_size=8)  # a sliding window
    assert tensor_out.shape == (1, 26)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_model_refuses_training(trained, fmt):
    model = q.quantize_weights(copy.deepcopy(trained), fmt)
    assert not model.training
    assert all(not m.weight.requires_grad for m in model.modules() if isinstance(m, q.QuantizedLinear))
    idx = torch.randint(0, 120, (2, 9))
    loss = model(idx[:, :-1], targets=idx[:, 1:])
    with pytest.raises(q.QuantizedTrainingError, match="inference only"):
        loss.backward()


def test_quantize_weights_rejects_bad_arguments(trained):
    with pytest.raises(ConfigError, match="int8, bfloat16, got 'int4'"):
        q.quantize_weights(copy.deepcopy(trained), "int4")
    with pytest.raises(ConfigError, match="holding a GPTModel"):
        q.quantize_weights(nn.Linear(2, 2), "int8")


def test_quantize_weights_is_idempotent_and_works_on_a_plain_model():
    plain = GPTModel(_cfg()).eval()
    q.quantize_weights(plain, "int8")
    first = {k: v.clone() for k, v in plain.state_dict().items()}
    q.quantize_weights(plain, "int8")
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in first.items())


# ------------------------------------------------------------------------------------------------
# the commands


def _args(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_model_source(parser, weights=True)
    return parser.parse_args(list(argv))


def test_load_model_from_args_quantizes_on_request():
    base = ["--preset", "tiny", "--seed", "0", "--device", "cpu"]
    assert q.weight_format(load_model_from_args(_args(*base))) is None
    assert q.weight_format(load_model_from_args(_args(*base, "--dtype", "int8"))) == "int8"
    model = load_model_from_args(_args(*base, "--weights", "bfloat16"))
    assert q.weight_format(model) == "bfloat16" and model.tok_emb.weight.dtype == torch.float32
    with pytest.raises(ConfigError, match="--dtype int8 means --weights int8"):
        load_model_from_args(_args(*base, "--dtype", "int8", "--weights", "bfloat16"))
    assert serve_parser().parse_args(["--preset", "tiny", "--weights", "int8"]).weights == "int8"


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(trained, path)
    return path


@pytest.mark.parametrize("flags", [["--dtype", "int8"], ["--weights", "bfloat16"], ["--weights", "int8", "--no-cache"]])
def test_generate_command_with_quantized_weights(capsys, monkeypatch, checkpoint, flags):
    import minigpt.cli.generate as cli

    monkeypatch.setattr(cli, "get_tokenizer", _ByteTokenizer)
    assert generate_main(["--checkpoint", str(checkpoint), "--prompt", "abc", "--max-new-tokens", "5", *flags]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("abc") and "5 tokens in" in err
    assert ("int8" in err) == ("int8" in flags) and ("bfloat16 weights" in err) == ("bfloat16" in flags)


def test_eval_perplexity_with_quantized_weights(tmp_path, capsys):
    text = tmp_path / "held-out.txt"
    text.write_text("Every effort moves you. " * 30, encoding="utf-8")
    model = ["--preset", "tiny", "--seed", "0", "--device", "cpu"]
    losses = {}
    for flags in ([], ["--dtype", "int8"], ["--weights", "bfloat16"]):
        assert eval_main(["perplexity", *model, "--data", str(text), "--json", "--no-progress", *flags]) == 0
        losses[" ".join(flags)] = json.loads(capsys.readouterr().out)["loss"]
    assert losses["--dtype int8"] == pytest.approx(losses[""], rel=0.01)
    assert losses["--weights bfloat16"] == pytest.approx(losses[""], rel=0.005)


class _ByteTokenizer:
    """Bytes as token ids (the test model's vocabulary is 120): enough for the command's streaming."""

    def encode(self, text, allowed_special=()):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")

    def decode_single_token_bytes(self, token_id):
        return bytes([token_id])
