"""One generated sequence of a request ("a row" of the decoding batch): its settings, its text so
far with stop strings found across token boundaries, and the events it sends back to its request."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field

import tiktoken
import torch

from ..generation import sample_next_token


@dataclass
class RowSpec:
    """What to generate: the prompt's token ids and how to choose each next token.

    `max_tokens` is already capped to what the context leaves; `logprobs` is None (none) or how
    many alternatives to report per token (0: the chosen token's only); `eos_id` ends the row.
    """

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    eos_id: int | None = None
    prompt_logprobs: bool = False


@dataclass
class TokenInfo:
    """A generated (or, with echo, a prompt) token: its log-probability and the top alternatives."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """What a row reports: `text` newly safe to show, the tokens behind it, or its end (`finish`)."""

    row: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish: str | None = None
    completion_tokens: int = 0


def token_info(log_probs: torch.Tensor, token_id: int, k: int | None) -> TokenInfo:
    """The log-probability of `token_id` in a (vocab,) row of log-probabilities, and its `k` best."""
    if not k:
        return TokenInfo(token_id, float(log_probs[token_id]))
    top = torch.topk(log_probs, k)
    return TokenInfo(token_id, float(log_probs[token_id]),
                     list(zip(top.indices.tolist(), top.values.tolist(), strict=True)))


class Row:
    """A row's state while it is decoded; `emit` delivers its `Event`s (from the engine's thread)."""

    def __init__(self, spec: RowSpec, index: int, tokenizer: tiktoken.Encoding,
                 emit: Callable[[Event], None], device: torch.device) -> None:
        self.spec, self.index, self.tokenizer, self.emit = spec, index, tokenizer, emit
        self.generator = None if spec.seed is None else torch.Generator(device).manual_seed(spec.seed)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent = "", 0  # the completion's text; how much of it was emitted
        self.pending: list[TokenInfo] = []
        self.generated = 0
        self.cancelled = False
        self.finished = False

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's (vocab,) logits, with its settings and generator."""
        s = self.spec
        return int(sample_next_token(logits[None].float(), s.temperature, s.top_k, s.top_p, self.generator))

    def add(self, token_id: int, logits: torch.Tensor) -> bool:
        """Take the chosen token; emit what became safe to show. True when the row has ended."""
        s = self.spec
        if s.eos_id is not None and token_id == s.eos_id:
            return self.finish("stop")
        self.generated += 1
        if s.logprobs is not None:
            self.pending.append(token_info(torch.log_softmax(logits.float(), -1), token_id, s.logprobs))
        self.text += self.decoder.decode(self.tokenizer.decode_single_token_bytes(token_id))
        cut = self.stop_at()
        if cut is not None:
            self.text = self.text[:cut]
            return self.finish("stop", cut=True)
        if self.generated >= s.max_tokens:
            return self.finish("length")
        self.flush(self.safe_end())
        return False

    def stop_at(self) -> int | None:
        """Where the earliest stop string begins in the text, if one is there now."""
        # Only a stop string ending in the newest piece can be new; look from just before it.
        found = [i for i in (self.text.find(stop, max(0, self.sent - len(stop))) for stop in self.spec.stop)
                 if i >= 0]
        return min(found) if found else None

    def safe_end(self) -> int:
        """How much text can be shown: all but a tail that may be the start of a stop string."""
        end = len(self.text)
        for stop in self.spec.stop:
            for n in range(min(len(stop) - 1, end - self.sent), 0, -1):
                if self.text.endswith(stop[:n]):
                    end = min(end, len(self.text) - n)
                    break
        return end

    def flush(self, end: int, finish: str | None = None) -> None:
        if end > self.sent or self.pending or finish:
            self.emit(Event(self.index, self.text[self.sent:end], self.pending, finish, self.generated))
            self.sent, self.pending = end, []

    def finish(self, reason: str, cut: bool = False) -> bool:
        """End the row: the rest of the text (incomplete UTF-8 bytes as U+FFFD) and why it ended."""
        if not cut:
            self.text += self.decoder.decode(b"", final=True)
        self.finished = True
        self.flush(len(self.text), reason)
        return True
