"""Hugging Face GPT-2 files: loading into GPTModel, export, from_pretrained and the convert CLI.

Every checkpoint is written here by `transformers` itself (`save_pretrained`) from a tiny
GPT2LMHeadModel whose every parameter is random, and the loaded GPTModel must give that
model's logits.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from minigpt import GPTConfig, GPTModel
from minigpt.checkpoint import CheckpointError, save_model
from minigpt.convert import main as convert_main
from minigpt.weights import detect_format, from_pretrained, load_hf, save_hf
from minigpt.weights.hf import gpt2_name, hf_name
from tests.hf_utils import random_hf_gpt2

VOCAB, CTX, EMB, LAYERS, HEADS = 100, 16, 32, 2, 4
ATOL = 1e-4


def random_gpt2(tie: bool = True, seed: int = 0) -> GPT2LMHeadModel:
    return random_hf_gpt2(n_layer=LAYERS, n_head=HEADS, n_embd=EMB, vocab=VOCAB, n_positions=CTX, seed=seed, tie=tie)


def random_gpt_model(cfg: GPTConfig, seed: int = 0) -> GPTModel:
    """A GPTModel in eval mode with every parameter random (its init leaves LayerNorms at 1/0)."""
    model = GPTModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, CTX), generator=torch.Generator().manual_seed(seed))


def max_diff(model: GPTModel, hf: GPT2LMHeadModel) -> float:
    x = tokens()
    with torch.no_grad():
        return (model(x) - hf(x).logits).abs().max().item()


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    return random_gpt2()


@pytest.fixture
def hf_dir(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_load_safetensors_matches_transformers(hf_model, hf_dir):
    model = from_pretrained(hf_dir)
    assert max_diff(model, hf_model) < ATOL
    assert not model.training
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_layers, cfg.n_heads) == (VOCAB, CTX, EMB, 2, 4)
    assert cfg.qkv_bias and cfg.tie_weights and cfg.drop_rate == 0.0
    assert model.out_head.weight is model.tok_emb.weight
    # A file path works too, and so does the explicit format.
    assert max_diff(from_pretrained(hf_dir / "model.safetensors", fmt="hf"), hf_model) < ATOL


def test_load_legacy_pytorch_bin(hf_model, tmp_path):
    """The layout of the original hub files: no `transformer.` prefix, mask buffers, a tied lm_head."""
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    state["lm_head.weight"] = state["wte.weight"]
    for i in range(LAYERS):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(CTX, CTX)).view(1, 1, CTX, CTX)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    hf_model.config.save_pretrained(tmp_path)
    assert detect_format(tmp_path) == "hf"
    assert max_diff(from_pretrained(tmp_path), hf_model) < ATOL


def test_load_sharded_safetensors(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert max_diff(load_hf(tmp_path).eval(), hf_model) < ATOL


def test_untied_checkpoint_keeps_its_head(tmp_path):
    hf = random_gpt2(tie=False, seed=3)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert not model.cfg.tie_weights
    assert max_diff(model, hf) < ATOL
    with pytest.raises(CheckpointError, match="separate output head.*tie_weights=False"):
        from_pretrained(tmp_path, tie_weights=True)


def test_tied_checkpoint_into_untied_model_copies_wte(hf_model, hf_dir):
    model = from_pretrained(hf_dir, tie_weights=False, drop_rate=0.1)
    assert model.out_head.weight is not model.tok_emb.weight
    assert torch.equal(model.out_head.weight, model.tok_emb.weight)
    assert model.cfg.drop_rate == 0.1
    assert max_diff(model, hf_model) < ATOL


@pytest.mark.parametrize("tie, qkv_bias", [(False, False), (True, True)])  # tutorial's, GPT-2's
def test_export_round_trip(tmp_path, tie, qkv_bias):
    cfg = GPTConfig(vocab_size=VOCAB, context_length=CTX, emb_dim=EMB, n_heads=HEADS, n_layers=LAYERS,
                    drop_rate=0.1, qkv_bias=qkv_bias, tie_weights=tie)
    model = random_gpt_model(cfg)
    save_hf(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is tie and config["n_positions"] == CTX
    assert ("lm_head.weight" in load_file(tmp_path / "out" / "model.safetensors")) is not tie

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert (hf.lm_head.weight is hf.transformer.wte.weight) is tie
    assert max_diff(model, hf) < ATOL

    back = from_pretrained(tmp_path / "out")
    assert back.cfg == cfg.replace(qkv_bias=True, drop_rate=0.0)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    if not qkv_bias:  # exported as zero biases, which compute the same thing
        assert not back.trf_blocks[0].att.W_query.bias.any()


def test_hf_names_round_trip(hf_model):
    names = list(hf_model.state_dict())
    assert {gpt2_name(n) for n in names} >= {"wte", "wpe", "ln_f/g", "ln_f/b", "h1/attn/c_attn/w",
                                             "h0/ln_2/g", "h1/mlp/c_proj/b"}
    assert [hf_name(gpt2_name(n)) for n in names] == names
    assert gpt2_name("h.3.attn.masked_bias") is None


def _write_state(hf_dir, change):
    file = hf_dir / "model.safetensors"
    state = load_file(file)
    change(state)
    save_file(state, file, metadata={"format": "pt"})


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"), r"missing tensors.*trf_blocks\.1\.ff\.layers\.0\.bias"),
    (lambda s: s.update({"transformer.h.0.attn.rotary.weight": torch.zeros(3)}),
     "unexpected tensor 'transformer.h.0.attn.rotary.weight', not part of GPT-2"),
    (lambda s: s.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(EMB, 100)}),
     r"h0/mlp/c_fc/w has shape \(32, 100\), the model needs \(32, 128\) for trf_blocks\.0\.ff\.layers\.0\.weight"),
    (lambda s: s.update({"transformer.wte.weight": torch.zeros(VOCAB + 1, EMB)}),
     r"config\.json disagrees with the tensors: wte is \(101, 32\), the config implies \(100, 32\)"),
])
def test_bad_tensors_are_named(hf_dir, change, message):
    _write_state(hf_dir, change)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(hf_dir)


@pytest.mark.parametrize("change, message", [
    ({"n_layer": 3}, r"config\.json disagrees with the tensors: it gives 3 layers, the tensors hold blocks h0\.\.h1"),
    ({"activation_function": "relu"}, "cannot reproduce activation_function='relu'"),
    ({"model_type": "llama"}, "model_type is 'llama', not 'gpt2'"),
])
def test_bad_config_is_an_error(hf_dir, change, message):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        load_hf(hf_dir)


def test_truncated_file_is_an_error(hf_dir):
    file = hf_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_hf(hf_dir)


def test_from_pretrained_minigpt_dir_and_bad_paths(tmp_path, tiny_cfg):
    model = random_gpt_model(tiny_cfg)
    save_model(model, tmp_path / "mine")
    assert detect_format(tmp_path / "mine") == "minigpt"
    loaded = from_pretrained(tmp_path / "mine", dtype=torch.bfloat16)
    assert loaded.cfg == tiny_cfg and loaded.tok_emb.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight.bfloat16())

    with pytest.raises(CheckpointError, match="no such file or directory, and not a GPT-2 model name"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown checkpoint format 'onnx'"):
        from_pretrained(tmp_path / "mine", fmt="onnx")


def test_convert_cli_round_trip(hf_model, hf_dir, tmp_path, capsys):
    assert convert_main(["--from", "hf", str(hf_dir), "--to", "minigpt", str(tmp_path / "mine")]) == 0
    assert detect_format(tmp_path / "mine") == "minigpt"
    assert convert_main(["--to", "hf", str(tmp_path / "back"), "--from", "minigpt", str(tmp_path / "mine")]) == 0
    assert "wrote hf checkpoint" in capsys.readouterr().out
    assert max_diff(from_pretrained(tmp_path / "back"), hf_model) < ATOL
    assert max_diff(from_pretrained(tmp_path / "mine"), hf_model) < ATOL


@pytest.mark.parametrize("argv, message", [
    (["--from", "tf", "x", "--to", "hf", "y"], "--from: unknown format 'tf'"),
    (["--from", "hf", "x", "--to", "onnx", "y"], "--to: unknown format 'onnx'"),
    (["--from", "hf", "{missing}", "--to", "hf", "{tmp}/y"], "error: .*missing: no such file or directory"),
    (["--from", "hf", "{hf}", "--to", "hf", "{hf}"], "already exists; pass --overwrite"),
])
def test_convert_cli_errors(argv, message, hf_dir, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path, hf=hf_dir) for a in argv]
    try:
        code = convert_main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    # argparse errors exit 2 with usage + message on stderr; the others are one "error: ..." line.
    assert code == 2 and re.search(message, err), err
    if not err.startswith("usage:"):
        assert err.startswith("error: ") and err.count("\n") == 1, err
