"""A compact re-statement of the tutorial's GPT model (chapter 4/5 of "LLMs from scratch",
as in the seed document 003), used as the reference for state_dict and init compatibility.

Same modules, created in the same order, same parameter names, and the `mask` buffer.
"""

import torch
from torch import nn


class TutorialMHA(nn.Module):
    def __init__(self, d_in, d_out, block_size, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(block_size, block_size), diagonal=1))

    def forward(self, x):
        b, n, _ = x.shape

        def heads(t):
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        k, q, v = heads(self.W_key(x)), heads(self.W_query(x)), heads(self.W_value(x))
        scores = q @ k.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:n, :n], -torch.inf)
        w = self.dropout(torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1))
        return self.out_proj((w @ v).transpose(1, 2).reshape(b, n, self.d_out))


class TutorialLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class TutorialGELU(nn.Module):
    def forward(self, x):
        c = torch.sqrt(torch.tensor(2.0 / torch.pi))
        return 0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3))))


class TutorialBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.att = TutorialMHA(d, d, cfg["ctx_len"], cfg["drop_rate"], cfg["n_heads"], cfg["qkv_bias"])
        self.ff = nn.Module()
        self.ff.layers = nn.Sequential(nn.Linear(d, 4 * d), TutorialGELU(), nn.Linear(4 * d, d),
                                       nn.Dropout(cfg["drop_rate"]))
        self.norm1 = TutorialLayerNorm(d)
        self.norm2 = TutorialLayerNorm(d)
        self.drop_resid = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = self.drop_resid(self.att(self.norm1(x))) + x
        return self.drop_resid(self.ff.layers(self.norm2(x))) + x


class TutorialGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["ctx_len"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TutorialBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = TutorialLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        return self.out_head(self.final_norm(self.trf_blocks(self.drop_emb(x))))
