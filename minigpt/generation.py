"""Text generation from a GPTModel: sampling, KV cache, batches of prompts, streaming.

`generate` keeps the tutorial's signature and meaning (temperature 0 is greedy, the
context is cropped to the last `context_size` tokens) and adds nucleus sampling, a
private random generator, per-row EOS, prompts of different lengths and a KV cache.
The sampling options travel together as one `SamplingConfig`.
"""

from __future__ import annotations

import codecs
import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import tiktoken
import torch

from .errors import ConfigError
from .model import GPTModel, KVCache
from .tokenizer import EOS_ID, EOS_TOKEN

Prompts = torch.Tensor | Sequence[Sequence[int] | torch.Tensor]


@dataclass
class SamplingConfig:
    """How each next token is chosen.

    `temperature` 0 is greedy; otherwise top-k, temperature and top-p filter the logits
    (see `filter_logits`) before sampling. `generator` is a `torch.Generator` on the
    model's device or an int seed (None: torch's global RNG, as the tutorial). A row
    stops at `eos_id`. `use_cache` reuses keys/values across steps (same tokens).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None
    generator: torch.Generator | int | None = None
    use_cache: bool = True


def check(max_new_tokens: int, sampling: SamplingConfig, vocab_size: int | None = None) -> None:
    """Raise ConfigError (a ValueError), naming the argument, for settings `generate` cannot honour."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p
    if not temperature >= 0.0:  # also rejects NaN
        raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= (vocab_size or top_k)):
        limit = f" and <= the vocabulary size {vocab_size}" if vocab_size else ""
        raise ConfigError(f"top_k must be >= 1{limit}, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Apply, in this order, top-k, temperature and top-p to (batch, vocab) logits.

    Removed tokens get -inf. Ties are kept rather than broken by token id, so the result
    never depends on how a sort orders equal values:
    - top-k keeps every logit >= the k-th largest (more than k tokens if some tie with it);
    - top-p (nucleus) ranks the temperature-scaled probabilities, keeps the shortest
      prefix whose sum reaches `top_p`, and also every token as likely as the last one kept.
    Top-k does not depend on the temperature; top-p does, so it comes after it.
    """
    if top_k is not None:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, -torch.inf)
    logits = logits / temperature
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(logits, dim=-1)
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        # The nucleus is the first n tokens, n = 1 + (how many partial sums stay below top_p).
        n_keep = (sorted_probs.cumsum(dim=-1) < top_p).sum(dim=-1, keepdim=True) + 1
        threshold = sorted_probs.gather(-1, n_keep.clamp(max=probs.shape[-1]) - 1)
        logits = logits.masked_fill(probs < threshold, -torch.inf)
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of (batch, vocab) logits: (batch, 1) token ids.

    Temperature 0 is greedy (`top_k`/`top_p` then change nothing); among equal maxima
    the lowest token id wins. Otherwise sample from `filter_logits`, with `generator`
    or, without one, torch's global RNG (as the tutorial does).
    """
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits.float(), temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# ---------------------------------------------------------------------------------------
# Decoding


def _as_padded_batch(idx: Prompts, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (batch, width) and the left padding of each row (None if there is none).

    A tensor is taken as is; a list of prompts of different lengths is right-aligned
    ("left padding"), the padding slots holding token 0, which the model masks out.
    """
    if isinstance(idx, torch.Tensor):
        if idx.dim() != 2:
            raise ConfigError(f"expected token ids of shape (batch, tokens), got {tuple(idx.shape)}")
        if idx.shape[1] == 0:
            raise ConfigError(f"got an empty prompt: start from {EOS_TOKEN} (id {EOS_ID}), as GPT-2 does")
        return idx.to(device), None
    prompts = [torch.as_tensor(p, dtype=torch.long).flatten().tolist() for p in idx]
    if not prompts:
        raise ConfigError("got no prompts")
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i} is empty: start it from {EOS_TOKEN} (id {EOS_ID}), as GPT-2 does")
    width = max(map(len, prompts))
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    rows = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    return rows, (pad if pad.any() else None)


def generate_tokens(model: GPTModel, idx: Prompts, max_new_tokens: int, context_size: int | None = None,
                    sampling: SamplingConfig | None = None, **options: Any) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, a (batch,) tensor, as each step produces it.

    `idx`, `max_new_tokens`, `context_size` as for `generate`; `sampling` (default: greedy)
    with any of its fields overridden by `options` (temperature=..., eos_id=...). The
    arguments are checked now, not at the first step. A row that has produced `eos_id`
    keeps getting `eos_id`; the iteration ends after `max_new_tokens` steps, or as soon
    as every row has produced `eos_id` (that last step is not yielded).
    """
    sampling = dataclasses.replace(sampling or SamplingConfig(), **options)
    tokens, left_pad = _as_padded_batch(idx, model.tok_emb.weight.device)
    context_size = model.cfg.context_length if context_size is None else context_size
    if not 1 <= context_size <= model.cfg.context_length:
        raise ConfigError(f"context_size must be in [1, {model.cfg.context_length}] "
                          f"(the model's context_length), got {context_size}")
    check(max_new_tokens, sampling, model.cfg.vocab_size)
    model.check_token_ids(tokens[:, -context_size:])
    if tokens.shape[1] > context_size:
        warnings.warn(f"prompt of {tokens.shape[1]} tokens is longer than the context "
                      f"({context_size}); only its last {context_size} tokens are used", stacklevel=2)
    if isinstance(sampling.generator, int):
        sampling.generator = torch.Generator(tokens.device).manual_seed(sampling.generator)
    return _Decoder(model, tokens, left_pad, context_size).run(max_new_tokens, sampling)


class _Decoder:
    """The decoding loop's state: one token buffer, the KV cache and the window it holds."""

    def __init__(self, model: GPTModel, prompt: torch.Tensor, left_pad: torch.Tensor | None,
                 context_size: int) -> None:
        self.model, self.left_pad, self.context_size = model, left_pad, context_size
        self.prompt = prompt
        self.window_start, self.window_pad = -1, None

    def run(self, max_new_tokens: int, sampling: SamplingConfig) -> Iterator[torch.Tensor]:
        model, (batch, length) = self.model, self.prompt.shape
        # One preallocated buffer for prompt and output (no torch.cat per step).
        tokens = torch.cat([self.prompt, self.prompt.new_empty(batch, max_new_tokens)], dim=1)
        cache = None
        if sampling.use_cache and max_new_tokens > 0:
            cache = KVCache(model.cfg, batch, min(self.context_size, length + max_new_tokens - 1),
                            device=tokens.device, dtype=model.tok_emb.weight.dtype)
        done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
        # Set up once per call, entered per step: between steps (while the caller has the
        # token) the model is the plain one, trainable as ever.
        decoding = model.decoding(batch) if max_new_tokens > 0 else None
        for _ in range(max_new_tokens):
            with torch.no_grad(), decoding:
                logits = self.step(tokens, length, cache)
            next_token = sample_next_token(logits[:, -1].float(), sampling.temperature, sampling.top_k,
                                           sampling.top_p, sampling.generator).squeeze(1)
            if sampling.eos_id is not None:
                next_token = next_token.masked_fill(done, sampling.eos_id)
                done |= next_token == sampling.eos_id
                if done.all():
                    return
            tokens[:, length] = next_token
            length += 1
            yield next_token

    def step(self, tokens: torch.Tensor, length: int, cache: KVCache | None) -> torch.Tensor:
        """Logits (batch, 1, vocab) for the token after `tokens[:, :length]`."""
        start = max(0, length - self.context_size)  # the model sees tokens[:, start:length]
        if cache is not None and start == self.window_start:
            # The cache holds this window but its newest token: feed just that one.
            return self.model(tokens[:, length - 1:length], cache, self.window_pad, last_only=True)
        # Run the whole window: the first step, every step without a cache, and every step
        # once the window slides. GPT-2's positions are absolute, so sliding changes every
        # cached key; re-running the window is what gives the tutorial's cropped-context tokens.
        self.window_start = start
        pad = None if self.left_pad is None else (self.left_pad - start).clamp(min=0)
        self.window_pad = pad if pad is not None and pad.any() else None  # None: plain causal attention
        if cache is not None:
            cache.reset()
        return self.model(tokens[:, start:length], cache, self.window_pad, last_only=True)


def generate(model: GPTModel, idx: Prompts, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             top_p: float | None = None, generator: torch.Generator | int | None = None,
             use_cache: bool = True) -> torch.Tensor | list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens.

    `idx` is a (batch, tokens) tensor, as in the tutorial, or a list of prompts (token-id
    lists or 1-D tensors) of any lengths, each continued exactly as if alone.
    `context_size` (default: the model's) crops what the model sees to the last tokens.
    `temperature`, `top_k`, `top_p`, `generator`, `use_cache`: see `SamplingConfig`.
    `eos_id`: a row stops at this token. A tensor result keeps one width: rows that
    stopped are filled with `eos_id` from their EOS on; once every row has stopped,
    generation ends without appending that last all-EOS step, so at batch size 1 the
    EOS is not in the output (as in the tutorial). A list result holds, per prompt, the
    prompt and its new tokens up to (not including) the first EOS.
    Run the model in eval mode; the result is on the model's device.
    """
    sampling = SamplingConfig(temperature, top_k, top_p, eos_id, generator, use_cache)
    steps = list(generate_tokens(model, idx, max_new_tokens, context_size, sampling))
    new = torch.stack(steps, dim=1) if steps else None
    if isinstance(idx, torch.Tensor):
        idx = idx.to(model.tok_emb.weight.device)
        return idx if new is None else torch.cat([idx, new], dim=1)
    out = []
    for i, prompt in enumerate(idx):
        row = [] if new is None else new[i].tolist()
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        out.append(torch.as_tensor(prompt).flatten().tolist() + row)
    return out


def decode_pieces(token_ids: Iterable[int], tokenizer: tiktoken.Encoding) -> Iterator[tuple[int, str]]:
    """Turn a stream of token ids into `(token_id, text)` pairs as the ids arrive.

    `text` is what the token completes. A GPT-2 token may hold part of a character
    (UTF-8 uses up to 4 bytes), so a character split over tokens arrives with its last
    token and the earlier ones carry only what they complete, often "". Joined, the
    pieces equal `tokenizer.decode` of the ids (incomplete bytes at the very end become
    U+FFFD, as there). A token that ends mid-character is held back until the next one
    arrives, so that the end of the stream can still give it that U+FFFD.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    held: tuple[int, str] | None = None
    for token_id in token_ids:
        if held is not None:
            yield held
        piece = (token_id, decoder.decode(tokenizer.decode_single_token_bytes(token_id)))
        held = piece if decoder.getstate()[0] else None  # bytes of a character still pending?
        if held is None:
            yield piece
    if held is not None:
        yield held[0], held[1] + decoder.decode(b"", final=True)


def stream(model: GPTModel, tokenizer: tiktoken.Encoding, prompt: str | Sequence[int],
           max_new_tokens: int, context_size: int | None = None, sampling: SamplingConfig | None = None,
           **options: Any) -> Iterator[tuple[int, str]]:
    """Generate from one prompt (text or token ids), yielding `(token_id, text)` per new token.

    See `decode_pieces` for `text`; `sampling` and `options` as for `generate_tokens`
    (temperature, top_k, top_p, eos_id, generator, use_cache).
    """
    ids = tokenizer.encode(prompt, allowed_special={EOS_TOKEN}) if isinstance(prompt, str) else prompt
    tokens = generate_tokens(model, [list(ids)], max_new_tokens, context_size, sampling, **options)
    return decode_pieces((int(t) for t in tokens), tokenizer)

