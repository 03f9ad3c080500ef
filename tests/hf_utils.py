"""Hugging Face GPT-2 <-> minigpt helpers for tests: a random HF model and a weight copy."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt.config import GPTConfig
from minigpt.model import GPTModel


def random_hf_gpt2(n_layer: int = 2, n_head: int = 4, n_embd: int = 32, vocab: int = 100,
                   n_positions: int = 32, seed: int = 0, tie: bool = True) -> GPT2LMHeadModel:
    """A small GPT2LMHeadModel (eval mode, no dropout) with *every* parameter random.

    HF's init leaves LayerNorms at 1/0 and biases at 0, which would hide a weight copied
    to the wrong place. Its small init also makes a random model just repeat its last
    token (the tied embedding dominates); with matrices at 3/sqrt(fan_in) the blocks
    decide, and greedy runs visit many tokens.
    """
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
                        n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                        tie_word_embeddings=tie)
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
                p.copy_(0.5 * noise)
            elif p.dim() == 2:  # Conv1D weights are [in, out]
                p.copy_(3.0 / p.shape[0] ** 0.5 * noise)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def copy_hf_into_minigpt(hf_model: GPT2LMHeadModel, **config_overrides) -> GPTModel:
    """A `GPTModel` (eval mode) holding the weights of a `GPT2LMHeadModel`.

    HF's Conv1D stores weights as [in, out], so they are transposed into our nn.Linear;
    its fused `c_attn` splits into W_query, W_key and W_value.
    """
    hc = hf_model.config
    cfg = GPTConfig(vocab_size=hc.vocab_size, context_length=hc.n_positions, emb_dim=hc.n_embd,
                    n_heads=hc.n_head, n_layers=hc.n_layer, drop_rate=0.0, qkv_bias=True,
                    tie_weights=hc.tie_word_embeddings).replace(**config_overrides)
    model = GPTModel(cfg).eval()
    sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    with torch.no_grad():
        model.tok_emb.weight.copy_(sd["transformer.wte.weight"])
        model.pos_emb.weight.copy_(sd["transformer.wpe.weight"])
        for i, block in enumerate(model.trf_blocks):
            h = f"transformer.h.{i}."
            q, k, v = sd[h + "attn.c_attn.weight"].t().chunk(3, dim=0)
            qb, kb, vb = sd[h + "attn.c_attn.bias"].chunk(3)
            for lin, w, b in ((block.att.W_query, q, qb), (block.att.W_key, k, kb),
                              (block.att.W_value, v, vb)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            pairs = [(block.att.out_proj, "attn.c_proj"), (block.ff.layers[0], "mlp.c_fc"),
                     (block.ff.layers[2], "mlp.c_proj")]
            for lin, name in pairs:
                lin.weight.copy_(sd[h + name + ".weight"].t())
                lin.bias.copy_(sd[h + name + ".bias"])
            for norm, name in ((block.norm1, "ln_1"), (block.norm2, "ln_2")):
                norm.scale.copy_(sd[h + name + ".weight"])
                norm.shift.copy_(sd[h + name + ".bias"])
        model.final_norm.scale.copy_(sd["transformer.ln_f.weight"])
        model.final_norm.shift.copy_(sd["transformer.ln_f.bias"])
        if not cfg.tie_weights:
            model.out_head.weight.copy_(sd["lm_head.weight"])
    return model
