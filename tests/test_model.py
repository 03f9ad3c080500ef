import math

import pytest
import torch

from minigpt.book import calc_loss_batch
from minigpt.config import GPTConfig
from minigpt.errors import ConfigError
from minigpt.model import FeedForward, GPTModel, KVCache, MultiHeadAttention, TransformerBlock, crop_context
from tests.tutorial_model import TutorialGPT

TUTORIAL_CFG = {"vocab_size": 100, "ctx_len": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
                "drop_rate": 0.1, "qkv_bias": False}


def test_parameter_names_and_shapes_match_the_tutorial_model():
    ours = GPTModel(TUTORIAL_CFG).state_dict()
    theirs = {k: v for k, v in TutorialGPT(TUTORIAL_CFG).state_dict().items() if not k.endswith(".mask")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert "trf_blocks.1.att.W_query.weight" in ours and "trf_blocks.0.ff.layers.2.bias" in ours


def test_torch_init_reproduces_the_tutorial_weights_draw_for_draw():
    torch.manual_seed(123)
    tutorial = TutorialGPT(TUTORIAL_CFG)
    torch.manual_seed(123)
    ours = GPTModel({**TUTORIAL_CFG, "init": "torch", "arithmetic": "tutorial"})
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, tutorial.state_dict()[name]), name
    # ... and the same dropout draws: train-mode outputs agree bit for bit.
    idx = torch.randint(0, 100, (2, 16))
    torch.manual_seed(7)
    expected = tutorial.train()(idx)
    torch.manual_seed(7)
    assert torch.equal(ours.train()(idx), expected)


def test_tutorial_state_dict_with_mask_buffer_loads():
    tutorial = TutorialGPT(TUTORIAL_CFG)
    ours = GPTModel(TUTORIAL_CFG)
    ours.load_state_dict(tutorial.state_dict())  # strict: only the mask buffers are extra
    idx = torch.randint(0, 100, (3, 10))
    torch.testing.assert_close(ours.eval()(idx), tutorial.eval()(idx), rtol=0, atol=1e-5)


def test_modules_take_the_walk_throughs_arguments():
    # Chapter 4 builds its blocks from the config dict and names the context `block_size`.
    block = TransformerBlock(TUTORIAL_CFG)
    assert block.att.context_length == 16 and block.att.num_heads == 4 and block.drop_shortcut.p == 0.1
    assert FeedForward(TUTORIAL_CFG).layers[0].weight.shape == (128, 32)
    att = MultiHeadAttention(d_in=32, d_out=32, block_size=16, dropout=0.0, num_heads=4, qkv_bias=True)
    assert att.context_length == 16 and att.W_query.bias is not None
    assert MultiHeadAttention(32, 32, 16, 0.0, 4).context_length == 16  # positional, as before
    with pytest.raises(TypeError, match="context_length or block_size"):
        MultiHeadAttention(32, 32, 16, 0.0, 4, block_size=16)
    with pytest.raises(TypeError, match="context_length or block_size"):
        MultiHeadAttention(32, 32, dropout=0.0, num_heads=4)


def test_gpt2_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, context_length=64, emb_dim=128, n_heads=4, n_layers=8)
    model = GPTModel(cfg)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    block = model.trf_blocks[3]
    assert block.att.W_query.weight.std().item() == pytest.approx(0.02, rel=0.05)
    resid_std = 0.02 / math.sqrt(2 * 8)
    assert block.att.out_proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert block.ff.layers[2].weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert torch.all(block.att.out_proj.bias == 0) and torch.all(block.ff.layers[0].bias == 0)
    assert torch.all(block.norm1.scale == 1) and torch.all(block.norm1.shift == 0)


def test_fast_and_tutorial_arithmetic_agree(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    reference = GPTModel(tiny_cfg.replace(arithmetic="tutorial")).eval()
    reference.load_state_dict(model.state_dict())
    for n in (1, 5, tiny_cfg.context_length):
        idx = torch.randint(0, tiny_cfg.vocab_size, (2, n))
        torch.testing.assert_close(model(idx), reference(idx), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arithmetic", ["fast", "tutorial"])
def test_causality(tiny_cfg, arithmetic):
    model = GPTModel(tiny_cfg.replace(arithmetic=arithmetic)).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 12))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % tiny_cfg.vocab_size
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_eval_is_deterministic_and_train_applies_dropout(tiny_cfg):
    model = GPTModel(tiny_cfg.replace(drop_rate=0.5))
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_logits_shape(tiny_cfg):
    out = GPTModel(tiny_cfg)(torch.randint(0, 100, (3, 7)))
    assert out.shape == (3, 7, tiny_cfg.vocab_size)


def test_untrained_124m_loss_is_close_to_uniform():
    torch.manual_seed(123)
    model = GPTModel(GPTConfig(context_length=64)).eval()
    idx = torch.randint(0, 50257, (2, 65))
    with torch.no_grad():
        loss = calc_loss_batch(idx[:, :-1], idx[:, 1:], model, "cpu").item()
    assert abs(loss - math.log(50257)) < 0.1, loss


def test_parameter_counts_match_the_tutorial():
    model = GPTModel("gpt2")
    assert model.num_parameters() == 163_009_536
    assert model.num_parameters(exclude_output_head=True) == 124_412_160
    tied = GPTModel(GPTConfig(tie_weights=True))
    assert tied.num_parameters() == 124_412_160
    assert tied.out_head.weight is tied.tok_emb.weight
    assert model.memory_mb() == pytest.approx(163_009_536 * 4 / 1024**2)
    assert model.memory_mb(torch.bfloat16) == pytest.approx(163_009_536 * 2 / 1024**2)


@pytest.mark.parametrize("idx,error,message", [
    (torch.zeros(1, 17, dtype=torch.long), ValueError, "17 tokens is longer than context_length 16"),
    (torch.zeros(1, 4), TypeError, "integer tensor, got dtype torch.float32"),
    (torch.zeros(4, dtype=torch.long), ValueError, "shape \\(batch, tokens\\), got \\(4,\\)"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "empty sequence"),
])
def test_bad_input_ids(tiny_cfg, idx, error, message):
    model = GPTModel(tiny_cfg)
    with pytest.raises(error, match=message):
        model(idx)
    with pytest.raises(error, match=message):  # the prompt check includes the forward's
        model.check_token_ids(idx)


@pytest.mark.parametrize("idx,message", [
    (torch.tensor([[1, 2, 100]]), "token id 100 is outside the vocabulary \\[0, 100\\)"),
    (torch.tensor([[1, -1]]), "token id -1 is outside"),
])
def test_token_ids_outside_the_vocabulary(tiny_cfg, idx, message):
    # Checked on the prompts (generation, the commands), not on every forward: reading ids is a host sync.
    model = GPTModel(tiny_cfg)
    with pytest.raises(ValueError, match=message):
        model.check_token_ids(idx)
    model.check_input(idx)
    model.check_token_ids(torch.tensor([[0, 99]]))


@pytest.mark.parametrize("arithmetic", ["fast", "tutorial"])
def test_kv_cache_matches_full_forward(tiny_cfg, arithmetic):
    model = GPTModel(tiny_cfg.replace(arithmetic=arithmetic)).eval()
    idx = torch.randint(0, 100, (2, 12))
    full = model(idx)
    cache = KVCache(tiny_cfg, batch_size=2)
    # prompt, one-token steps, then a multi-token chunk after a cached prefix
    parts = [model(idx[:, :5], cache)] + [model(idx[:, t:t + 1], cache) for t in range(5, 8)]
    parts.append(model(idx[:, 8:], cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == 12
    with pytest.raises(ValueError, match="longer than context_length"):
        model(torch.zeros(2, 5, dtype=torch.long), cache)


def test_crop_context_keeps_the_first_positions(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    idx = torch.randint(0, 100, (2, 8))
    full = model(idx)
    pos = model.pos_emb.weight.detach().clone()
    crop_context(model, 8)
    assert model.cfg.context_length == 8 and model.trf_blocks[0].att.context_length == 8
    assert torch.equal(model.pos_emb.weight, pos[:8]) and model.pos_emb.num_embeddings == 8
    torch.testing.assert_close(model(idx), full, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="context length 9 exceeds the model's 8"):
        crop_context(model, 9)
    with pytest.raises(ValueError, match="longer than context_length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_decoding_hook_is_a_reusable_no_op(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    idx = torch.randint(0, 100, (1, 5))
    decoding = model.decoding(1)
    with torch.no_grad():
        for _ in range(2):  # generation enters it once per step
            with decoding:
                assert torch.equal(model(idx), model(idx))


def test_modules_validate_their_arithmetic():
    with pytest.raises(ConfigError, match="arithmetic must be one of"):
        MultiHeadAttention(8, 8, 4, arithmetic="reference")
