"""Held-out perplexity and bits per byte by the sliding-window method of Hugging Face's guide.

"Perplexity of fixed-length models" (https://huggingface.co/docs/transformers/perplexity): windows
of `context_length` tokens start every `stride` tokens; each scores only the tokens the previous
window did not reach, so every token is scored once, with at least `context_length - stride`
tokens of left context once the first window is past. `stride == context_length` gives disjoint
windows (fast, less context per token); the first token of each window is then predicted by none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import tiktoken
import torch

from ..errors import ConfigError, DataError
from ..model import GPTModel
from .scoring import score_tails, token_byte_lengths


@dataclass(frozen=True)
class PerplexityResult:
    """Totals over the scored tokens; the usual numbers are properties."""

    nats: float  # summed negative log-likelihood, natural log
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes those tokens stand for
    windows: int
    context_length: int
    stride: int

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token (the training loss's unit)."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """Total bits / UTF-8 bytes: comparable across tokenizers, unlike the loss per token."""
        return self.nats / math.log(2) / self.bytes if self.bytes else float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes, "windows": self.windows,
                "context_length": self.context_length, "stride": self.stride}


def sliding_windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """`(begin, end, scored)` for each window `ids[begin:end]`: its last `scored` tokens are scored."""
    if not 1 <= stride <= context_length:
        raise ConfigError(f"stride must be in [1, context length {context_length}], got {stride}")
    if context_length < 2:
        raise ConfigError(f"a window needs at least 2 tokens, got a context length of {context_length}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        first = max(prev_end, begin + 1)  # a window's first token has no context in it
        if end > first:
            windows.append((begin, end, end - first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def evaluate_perplexity(model: GPTModel, ids: Sequence[int] | torch.Tensor, tokenizer: tiktoken.Encoding,
                        context_length: int | None = None, stride: int | None = None, batch_size: int = 4,
                        progress: bool = False) -> PerplexityResult:
    """Score token ids (e.g. a held-out text's) with the sliding-window method (see the module).

    `context_length` defaults to the model's, `stride` to half of it. Bits per byte count the
    bytes of the scored tokens (`tokenizer` says how many each stands for): start `ids` with
    the end-of-text token so that every token of the text is scored, and the bytes are the text's.
    Run the model in eval mode.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    context_length = model.cfg.context_length if context_length is None else context_length
    if context_length > model.cfg.context_length:
        raise ConfigError(f"context length {context_length} exceeds the model's {model.cfg.context_length}")
    stride = max(1, context_length // 2) if stride is None else stride
    if len(ids) < 2:
        raise DataError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    windows = sliding_windows(len(ids), context_length, stride)
    requests = [(ids[begin:end].tolist(), scored) for begin, end, scored in windows]
    scores = score_tails(model, requests, batch_size, progress, desc="perplexity")
    nats = -sum(float(s.logprobs.double().sum()) for s in scores)
    targets = torch.cat([ids[end - scored:end] for _, end, scored in windows])
    n_bytes = int(token_byte_lengths(tokenizer, model.cfg.vocab_size)[targets].sum())
    return PerplexityResult(nats, len(targets), n_bytes, len(windows), context_length, stride)
