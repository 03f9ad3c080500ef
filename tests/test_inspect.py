import math
import sys
import types

import pytest
import torch

from minigpt import GPTConfig, GPTModel
from minigpt.checkpoint import save_model
from minigpt.cli.inspect import main
from minigpt.inspection import (
    attention_maps,
    hidden_state_names,
    hidden_states,
    nearest_neighbors,
    query_key_value,
    summary,
)
from minigpt.plot import plot_attention, plot_attention_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT = "Every effort moves you"


def gpt2_vocab_cfg(**changes) -> GPTConfig:
    """GPT-2's full vocabulary (so real words tokenize) but otherwise tiny."""
    return GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=2,
                     drop_rate=0.0, tie_weights=True).replace(**changes)


# ----------------------------------------------------------------------------- neighbours

def test_neighbors_from_a_hand_built_embedding_table(tokenizer):
    hospital, ization = tokenizer.encode("hospitalization")
    space_hospital, = tokenizer.encode(" hospital")
    doctor, = tokenizer.encode("doctor")
    model = GPTModel(gpt2_vocab_cfg(emb_dim=8, n_layers=1))
    e = torch.eye(8)
    with torch.no_grad():
        table = model.tok_emb.weight
        table.normal_()
        table[:, :3] = 0.0  # every other token is orthogonal to the word: cosine 0
        # The word's two tokens average to e0; alone each is at cosine 0.707 from it,
        # which would beat the third neighbour if own tokens were not left out.
        table[hospital] = e[0] + e[1]
        table[ization] = e[0] - e[1]
        table[space_hospital] = e[0]
        table[doctor] = e[0] + 0.5 * e[2]
        table[100] = e[0] + 2.0 * e[2]

    found = nearest_neighbors(model, tokenizer, "hospitalization", k=3)

    assert [n.token_id for n in found] == [space_hospital, doctor, 100]
    assert [n.token for n in found] == [" hospital", "doctor", tokenizer.decode([100])]
    expected = [1.0, 1 / math.sqrt(1.25), 1 / math.sqrt(5.0)]
    assert [n.similarity for n in found] == pytest.approx(expected, abs=1e-6)


def test_neighbors_reject_a_word_outside_the_model_vocabulary(tokenizer, tiny_cfg):
    model = GPTModel(tiny_cfg)  # 100 tokens: " hospital" (4436) is not among them
    with pytest.raises(ValueError, match="outside the model's vocabulary of 100"):
        nearest_neighbors(model, tokenizer, " hospital")
    with pytest.raises(ValueError, match="empty"):
        nearest_neighbors(model, tokenizer, "")


# ----------------------------------------------------------------------------- hidden states

def test_hidden_states_match_a_manual_forward_pass(tiny_cfg):
    model = GPTModel(tiny_cfg.replace(drop_rate=0.3))
    model.train()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 7))

    states = hidden_states(model, idx)

    assert model.training, "the caller's training mode is restored"
    assert list(states) == ["embedding", "block_0", "block_1", "final_norm"] == hidden_state_names(model)
    model.eval()
    with torch.no_grad():
        x = model.tok_emb(idx) + model.pos_emb(torch.arange(7))
        expected = [x]
        for block in model.trf_blocks:
            x = x + block.att(block.norm1(x))
            x = x + block.ff(block.norm2(x))
            expected.append(x)
        expected.append(model.final_norm(x))
        logits = model(idx)
    for (name, got), want in zip(states.items(), expected, strict=True):
        assert got.shape == (2, 7, tiny_cfg.emb_dim), name
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(model.out_head(states["final_norm"]), logits, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- attention

def test_attention_rows_sum_to_one_and_are_causal(tiny_cfg):
    model = GPTModel(tiny_cfg)
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 9))

    weights = attention_maps(model, idx, layer=1)

    assert weights.shape == (tiny_cfg.n_heads, 9, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(tiny_cfg.n_heads, 9))
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)
    assert (weights[:, future] == 0).all()
    assert (weights[:, ~future] > 0).all()
    torch.testing.assert_close(weights[:, 0, 0], torch.ones(tiny_cfg.n_heads))
    torch.testing.assert_close(attention_maps(model, idx[0], layer=1), weights)  # (tokens,) works too


def test_attention_weights_reproduce_the_fast_attention_output(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    assert model.cfg.arithmetic == "fast"
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 11))
    block = model.trf_blocks[1]

    weights = attention_maps(model, idx, layer=1)
    _, _, values = query_key_value(model, idx, layer=1)
    # weights @ V per head, heads concatenated, through out_proj: the module's own output.
    context = (weights @ values[0]).transpose(0, 1).reshape(11, tiny_cfg.emb_dim)
    with torch.no_grad():
        expected = block.att(block.norm1(hidden_states(model, idx)["block_0"]))[0]
        rebuilt = block.att.out_proj(context)
    torch.testing.assert_close(rebuilt, expected, rtol=0, atol=1e-6)


def test_attention_rejects_bad_layer_and_batch(tiny_cfg):
    model = GPTModel(tiny_cfg)
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 5))
    with pytest.raises(ValueError, match=r"layer 2 does not exist; the model has layers 0\.\.1"):
        attention_maps(model, idx, layer=2)
    with pytest.raises(ValueError, match="one sequence"):
        attention_maps(model, idx.repeat(2, 1), layer=0)


# ----------------------------------------------------------------------------- summary

@pytest.mark.parametrize("tie", [False, True])
def test_summary_counts_add_up_to_the_model(tiny_cfg, tie):
    model = GPTModel(tiny_cfg.replace(tie_weights=tie))
    rows = {r.name: r for r in summary(model)}

    assert sum(r.params for r in rows.values()) == model.num_parameters()
    assert rows["tok_emb"].shapes == "weight (100, 32)"
    assert rows["tok_emb"].params == 3200
    assert rows["trf_blocks.0.att.out_proj"].shapes == "weight (32, 32), bias (32,)"
    assert rows["trf_blocks.0.att.out_proj"].params == 32 * 32 + 32
    assert rows["final_norm"].kind == "LayerNorm"
    if tie:
        assert rows["out_head"].shapes == "weight = tok_emb.weight"
        assert rows["out_head"].params == 0
    else:
        assert rows["out_head"].params == 3200


# ----------------------------------------------------------------------------- pictures

def test_attention_pictures_are_written(tmp_path):
    weights = torch.softmax(torch.randn(3, 4, 4), dim=-1)
    one = plot_attention(weights[0], ["a", "␣b", "c", "d"], tmp_path / "sub" / "one.png", title="t")
    grid = plot_attention_grid(weights, ["a", "b", "c", "d"], tmp_path / "grid.png")
    for path in (one, grid):
        assert path.read_bytes().startswith(PNG_MAGIC)
        assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        plot_attention(weights[0], ["a", "b", "c"], tmp_path / "bad.png")


# ----------------------------------------------------------------------------- CLI

@pytest.fixture
def checkpoint(tmp_path):
    model = GPTModel(gpt2_vocab_cfg())
    return model, save_model(model, tmp_path / "model")


def run_cli(capsys, *argv: str) -> str:
    assert main([*argv, "--device", "cpu"]) == 0
    return capsys.readouterr().out


def test_cli_neighbors_and_summary(checkpoint, capsys, tokenizer):
    model, path = checkpoint
    out = run_cli(capsys, "neighbors", "hospital", "--k", "3", "--checkpoint", str(path))
    best = nearest_neighbors(model, tokenizer, "hospital", k=3)
    rows = out.splitlines()[3:]
    assert len(rows) == 3
    assert rows[0].split()[:2] == ["1", str(best[0].token_id)]
    assert f"{best[2].similarity:.4f}" in rows[2]

    out = run_cli(capsys, "summary", "--checkpoint", str(path))
    assert f"total parameters: {model.num_parameters():,}" in out
    assert f"{model.memory_mb(torch.bfloat16):.2f} MB in bfloat16" in out


def test_cli_hidden_states(checkpoint, capsys):
    _, path = checkpoint
    out = run_cli(capsys, "hidden-states", TEXT, "--checkpoint", str(path))
    names = [line.split()[0] for line in out.splitlines()[3:]]
    assert names == ["embedding", "block_0", "block_1", "final_norm"]
    assert "␣effort" in out.splitlines()[1]


def test_cli_attention_pictures_named_in_output(checkpoint, capsys, tmp_path):
    _, path = checkpoint
    out_dir = tmp_path / "pics"
    out = run_cli(capsys, "attention", TEXT, "--layer", "1", "--head", "1", "--out-dir", str(out_dir),
                  "--checkpoint", str(path))
    assert out.strip() == f"wrote {out_dir / 'attention-layer1-head1.png'}"
    out = run_cli(capsys, "attention", TEXT, "--all", "--out-dir", str(out_dir), "--preset", "tiny")
    assert out.strip() == f"wrote {out_dir / 'attention-layer0.png'}"
    for png in ("attention-layer1-head1.png", "attention-layer0.png"):
        assert (out_dir / png).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("argv, message", [
    (["attention", TEXT, "--layer", "2"], "error: layer 2 does not exist"),
    (["attention", TEXT, "--head", "-1"], "error: head -1 does not exist"),
    (["hidden-states", " x" * 20], "error: sequence of 20 tokens is longer than context_length 16"),
])
def test_cli_bad_input_is_one_clear_error(checkpoint, argv, message, capsys):
    _, path = checkpoint
    assert main([*argv, "--checkpoint", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_cli_missing_checkpoint_and_bad_k(tmp_path, capsys):
    assert main(["summary", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such checkpoint directory\n"
    with pytest.raises(SystemExit) as exc:
        main(["neighbors", "hospital", "--k", "0", "--preset", "tiny"])
    assert exc.value.code == 2
    assert "--k: must be a positive integer, got 0" in capsys.readouterr().err


def test_cli_pretrained_goes_through_minigpt_weights(monkeypatch, capsys, tiny_cfg):
    requested = []

    def from_pretrained(name, **options):
        requested.append(name)
        return GPTModel(tiny_cfg)

    monkeypatch.setitem(sys.modules, "minigpt.weights", types.SimpleNamespace(from_pretrained=from_pretrained))
    out = run_cli(capsys, "summary", "--pretrained", "gpt2-xyz")
    assert requested == ["gpt2-xyz"]
    assert f"total parameters: {GPTModel(tiny_cfg).num_parameters():,}" in out

    monkeypatch.setitem(sys.modules, "minigpt.weights", None)  # as if the module did not exist
    assert main(["summary", "--pretrained", "gpt2"]) == 2
    assert capsys.readouterr().err == "error: --pretrained needs minigpt.weights, which this installation lacks\n"
