"""GPT-2, written out by hand: LayerNorm, GELU, attention, blocks and the model.

Module and parameter names follow the "LLMs from scratch" tutorial model, so its
state_dicts and its `load_weights_into_gpt` work here unchanged. `arithmetic="tutorial"`
computes the tutorial's formulas (its numbers bit for bit); `"fast"` the same functions
with one-kernel `F.*` calls. CPU-specific speed-ups live apart, in `minigpt.backends.cpu`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig, as_config, check_arithmetic
from .errors import ConfigError
from .loss import HeadProducts, linear_cross_entropy


class LayerNorm(nn.Module):
    """Normalise each token's vector to zero mean and unit variance, then scale and shift.

    `arithmetic="fast"` computes the same function with one kernel (`F.layer_norm`), which keeps
    only the mean and 1/std for the backward pass instead of every intermediate of the formula.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5, arithmetic: str = "tutorial") -> None:
        super().__init__()
        self.eps = eps
        self.arithmetic = check_arithmetic(arithmetic)
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arithmetic == "fast":
            return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)  # biased, as GPT-2 and nn.LayerNorm
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


# sqrt(2/pi) rounded in float32 first, as the tutorial computes it, so results match bit for bit.
_SQRT_2_OVER_PI = torch.sqrt(torch.tensor(2.0 / math.pi)).item()


class GELU(nn.Module):
    """GELU with GPT-2's tanh approximation; `arithmetic="fast"` uses the one-kernel `F.gelu`."""

    def __init__(self, arithmetic: str = "tutorial") -> None:
        super().__init__()
        self.arithmetic = check_arithmetic(arithmetic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arithmetic == "fast":
            return F.gelu(x, approximate="tanh")
        return 0.5 * x * (1 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    """Position-wise MLP: expand 4x, GELU, project back."""

    def __init__(self, cfg: GPTConfig | dict[str, Any]) -> None:
        super().__init__()
        cfg = as_config(cfg)
        # The trailing Dropout is the tutorial's; together with the block's residual
        # dropout it is what makes the tutorial's training numbers reproduce exactly.
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(cfg.arithmetic),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
            nn.Dropout(cfg.drop_rate),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    `length` counts the positions already written; `GPTModel.forward` advances it.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        max_len = cfg.context_length if max_len is None else max_len
        if not 0 < max_len <= cfg.context_length:
            raise ConfigError(f"KVCache max_len must be in [1, {cfg.context_length}], got {max_len}")
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_len, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def reset(self) -> None:
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values of `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def causal_mask(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """Boolean (n_queries, n_keys) mask, True where a query may attend.

    The queries are the last `n_queries` of the `n_keys` positions.
    """
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(n_keys - n_queries)


def left_pad_mask(left_pad: torch.Tensor, n_queries: int, n_keys: int) -> torch.Tensor:
    """Boolean (batch, 1, n_queries, n_keys) causal mask that also hides left padding.

    Row b starts with `left_pad[b]` padding slots. A padding query may attend only to
    itself: a row with nothing to attend to would make softmax NaN, and 0 * NaN would
    leak into the real tokens even though they never attend to padding.
    """
    keys = torch.arange(n_keys, device=left_pad.device)
    queries = keys[n_keys - n_queries:, None]
    is_real_key = keys >= left_pad[:, None, None]  # (batch, 1, n_keys)
    return ((keys <= queries) & (is_real_key | (keys == queries))).unsqueeze(1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """softmax(scores / sqrt(head_dim)) over the keys each query may attend (`mask`, causal by default)."""
    if mask is None:
        mask = causal_mask(scores.shape[-2], scores.shape[-1], scores.device)
    scores = scores.masked_fill(~mask, -torch.inf)
    return torch.softmax(scores / head_dim ** 0.5, dim=-1)


def _drop_tutorial_mask(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # The tutorial's attention stores its causal mask as a buffer; it carries no information.
    state_dict.pop(prefix + "mask", None)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention.

    `block_size` is another name for `context_length`, the one the chapter-4 walk-through uses.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int | None = None, dropout: float = 0.0,
                 num_heads: int = 1, qkv_bias: bool = False, arithmetic: str = "fast", *,
                 block_size: int | None = None) -> None:
        super().__init__()
        if (context_length is None) == (block_size is None):
            raise TypeError("MultiHeadAttention takes context_length or block_size (the same thing), exactly one")
        if d_out % num_heads:
            raise ConfigError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = block_size if context_length is None else context_length
        self.arithmetic = check_arithmetic(arithmetic)
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # No (context x context) mask buffer: the causal mask is made only where needed.
        self.register_load_state_dict_pre_hook(_drop_tutorial_mask)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, each (batch, heads, tokens, head_dim)."""
        return (self._split_heads(self.W_query(x)), self._split_heads(self.W_key(x)),
                self._split_heads(self.W_value(x)))

    def attention_weights(self, queries: torch.Tensor, keys: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(QK^T / sqrt(d)) with future positions masked: (batch, heads, q, k).

        `mask` (True = may attend) replaces the causal mask, e.g. `left_pad_mask`.
        """
        return masked_softmax(queries @ keys.transpose(2, 3), mask, keys.shape[-1])

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(QK^T / sqrt(d)) V, each head's context: (batch, heads, q, head_dim)."""
        if self.arithmetic == "tutorial":
            return self.dropout(self.attention_weights(queries, keys, mask)) @ values
        n, n_keys = queries.shape[2], keys.shape[2]
        # Without padding: a single new query may see every cached key; a full prompt
        # is plain causal; a chunk after a cached prefix needs the offset mask.
        if mask is None and 1 < n < n_keys:
            mask = causal_mask(n, n_keys, queries.device)
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, is_causal=mask is None and n > 1,
                                              dropout_p=self.dropout.p if self.training else 0.0)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        queries, keys, values = self.qkv(x)
        if kv_cache is not None:
            keys, values = kv_cache.update(layer, keys, values)
        context = self.attend(queries, keys, values, mask)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(norm1(x)), then x + ff(norm2(x))."""

    def __init__(self, cfg: GPTConfig | dict[str, Any]) -> None:
        super().__init__()
        cfg = as_config(cfg)
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim, d_out=cfg.emb_dim, context_length=cfg.context_length,
            dropout=cfg.drop_rate, num_heads=cfg.n_heads, qkv_bias=cfg.qkv_bias, arithmetic=cfg.arithmetic)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim, arithmetic=cfg.arithmetic)
        self.norm2 = LayerNorm(cfg.emb_dim, arithmetic=cfg.arithmetic)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache, layer, mask))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, `n_layers` blocks, final LayerNorm, output head."""

    # The products of the loss from `targets`; the CPU backend swaps in its own.
    head_products = HeadProducts()

    def __init__(self, cfg: GPTConfig | dict[str, Any] | str) -> None:
        super().__init__()
        cfg = as_config(cfg)
        self.cfg = cfg
        # Created in the tutorial's order, so that with init="torch" the same seed gives
        # the tutorial model's weights draw for draw.
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim, arithmetic=cfg.arithmetic)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.init == "gpt2":
            self.apply(self._init_gpt2)
            # GPT-2 paper: every residual branch adds to the stream, so its variance grows
            # with depth; scaling the layers that write into it by 1/sqrt(2 * n_layers)
            # (two branches per block) keeps the stream's scale independent of depth.
            std = 0.02 / math.sqrt(2 * cfg.n_layers)
            for block in self.trf_blocks:
                nn.init.normal_(block.att.out_proj.weight, mean=0.0, std=std)
                nn.init.normal_(block.ff.layers[2].weight, mean=0.0, std=std)
        if cfg.tie_weights:
            # Sharing the matrix saves vocab_size * emb_dim parameters (38.6M for GPT-2 small).
            self.out_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_gpt2(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def check_input(self, in_idx: torch.Tensor, start_pos: int = 0) -> None:
        """Raise a clear error for a shape, dtype or length the model cannot take (no host sync)."""
        if not isinstance(in_idx, torch.Tensor) or in_idx.dim() != 2:
            shape = tuple(in_idx.shape) if isinstance(in_idx, torch.Tensor) else type(in_idx).__name__
            raise ValueError(f"expected token ids of shape (batch, tokens), got {shape}")
        if in_idx.dtype.is_floating_point or in_idx.dtype.is_complex or in_idx.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got dtype {in_idx.dtype}")
        n = in_idx.shape[1]
        if n == 0:
            raise ValueError("got an empty sequence: at least one token id is needed")
        if start_pos + n > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start_pos + n} tokens is longer than context_length "
                f"{self.cfg.context_length}; crop it to the last {self.cfg.context_length} tokens")

    def check_token_ids(self, in_idx: torch.Tensor) -> None:
        """`check_input`, and a clear error for ids outside the vocabulary (reads them: a host sync)."""
        self.check_input(in_idx)
        lo, hi = int(in_idx.min()), int(in_idx.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")

    def hidden_states(self, in_idx: torch.Tensor, kv_cache: KVCache | None = None,
                      left_pad: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """The final LayerNorm's output (batch, tokens, emb_dim) for token ids (batch, tokens):
        what the output head reads, and what other heads (`minigpt.heads`) read instead.

        `kv_cache`, `left_pad` and `last_only` are `forward`'s (last_only: (batch, 1, emb_dim)).
        """
        start = 0 if kv_cache is None else kv_cache.length
        self.check_input(in_idx, start)
        n = in_idx.shape[1]
        if kv_cache is not None and start + n > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} positions; {start + n} needed")
        pos = torch.arange(start, start + n, device=in_idx.device)
        mask = None
        if left_pad is not None:
            mask = left_pad_mask(left_pad, n, start + n)
            pos = (pos - left_pad[:, None]).clamp(min=0)  # (batch, tokens); padding sits at 0
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, kv_cache, layer, mask)
        if kv_cache is not None:
            kv_cache.length += n
        if last_only:
            x = x[:, -1:]
        return self.final_norm(x)

    def forward(self, in_idx: torch.Tensor, kv_cache: KVCache | None = None,
                left_pad: torch.Tensor | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, tokens, vocab_size) for token ids (batch, tokens): `out_head(hidden_states(...))`.

        With a `kv_cache`, `in_idx` continues the cached sequence and the cache is advanced.
        `left_pad` (batch,) counts the padding slots at the start of each row (prompts of
        different lengths, right-aligned): they are masked out and each row's positions
        start at its first real token, so a row gets the logits it would get alone.
        `last_only` computes the output head for the last position only (batch, 1, vocab):
        all that decoding needs, and the head is the largest matrix multiply.
        With `targets` (batch, tokens), return instead the mean cross-entropy of the next-token
        predictions, computed without materialising the logits (`linear_cross_entropy`):
        `targets` are the tutorial's, already shifted (`targets[:, i]` is the token after
        `in_idx[:, i]`). `labels` are Hugging Face's (`labels=input_ids`): the model shifts them,
        scoring position i against `labels[:, i + 1]`. Either way -100 marks a token not scored.
        """
        if targets is not None and labels is not None:
            raise ValueError("give targets (already shifted, the tutorial's) or labels (Hugging Face's), not both")
        x = self.hidden_states(in_idx, kv_cache, left_pad, last_only)
        if labels is not None:
            x, targets = x[:, :-1], labels[:, 1:]
        if targets is not None:
            return linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.out_head.weight, targets.reshape(-1),
                                        products=self.head_products)
        return self.out_head(x)

    def decoding(self, batch_size: int) -> contextlib.AbstractContextManager[None]:
        """A context manager generation enters for each no-grad decoding step of `batch_size` rows.

        Nothing here; the CPU backend (`optimize_for_cpu`) packs the weights for decoding when
        this is called and switches them on inside the context.
        """
        return contextlib.nullcontext()

    def num_parameters(self, exclude_output_head: bool = False, exclude_position: bool = False) -> int:
        """Count distinct parameters (a tied head counts once).

        `exclude_output_head` reports the size as GPT-2 does (124M for the small model).
        """
        params = {id(p): p for p in self.parameters()}
        if exclude_output_head and self.out_head.weight is not self.tok_emb.weight:
            params.pop(id(self.out_head.weight))
        if exclude_position:
            params.pop(id(self.pos_emb.weight))
        return sum(p.numel() for p in params.values())

    def memory_mb(self, dtype: torch.dtype | None = None) -> float:
        """Size of the parameters in MB (1 MB = 1024**2 bytes), in their dtype or in `dtype`."""
        params = {id(p): p for p in self.parameters()}.values()
        if dtype is None:
            return sum(p.numel() * p.element_size() for p in params) / 1024**2
        return sum(p.numel() for p in params) * dtype.itemsize / 1024**2


def crop_context(model: GPTModel, context_length: int) -> None:
    """Shorten a model's context (e.g. pretrained GPT-2's 1024) by keeping the first positions."""
    if context_length > model.cfg.context_length:
        raise ConfigError(f"context length {context_length} exceeds the model's {model.cfg.context_length}")
    model.pos_emb.weight = nn.Parameter(model.pos_emb.weight.detach()[:context_length].clone())
    model.pos_emb.num_embeddings = context_length
    model.cfg = model.cfg.replace(context_length=context_length)
    for block in model.trf_blocks:
        block.att.context_length = context_length
