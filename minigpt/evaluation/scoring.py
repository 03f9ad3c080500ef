"""Scoring text with a GPT: the log-probability of the last tokens of token sequences, batched.

Every evaluation here reduces to one question, asked of many sequences at once: how likely are
the last `k` tokens of this sequence given the ones before? (`score_tails`). Perplexity asks it
of sliding windows, HellaSwag of a context followed by each ending, the lm-evaluation-harness of
its (context, continuation) requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tiktoken
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..model import GPTModel


@dataclass(frozen=True)
class TailScore:
    """The scored tail of one sequence: its tokens' log-probabilities and whether greedy decoding
    would have produced every one of them."""

    logprobs: torch.Tensor  # (k,) float32, natural log
    greedy: bool

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())


def token_byte_lengths(tokenizer: tiktoken.Encoding, vocab_size: int | None = None) -> torch.Tensor:
    """The UTF-8 bytes each token id stands for, (vocab_size,) int64.

    Special tokens (GPT-2's end-of-text, which separates documents) and ids beyond the
    tokenizer's vocabulary count 0 bytes: they stand for no text.
    """
    vocab_size = tokenizer.n_vocab if vocab_size is None else vocab_size
    special = set(tokenizer.special_tokens_set)
    special_ids = {tokenizer.encode_single_token(t) for t in special}
    lengths = [0 if i in special_ids or i >= tokenizer.n_vocab else len(tokenizer.decode_single_token_bytes(i))
               for i in range(vocab_size)]
    return torch.tensor(lengths, dtype=torch.long)


def _check(model: GPTModel, seq: Sequence[int], k: int) -> None:
    if not 1 <= k < len(seq):
        raise ConfigError(f"cannot score the last {k} of {len(seq)} tokens: at least one token of context "
                          "must come before them")
    if len(seq) - 1 > model.cfg.context_length:
        raise ConfigError(f"a sequence of {len(seq)} tokens needs {len(seq) - 1} positions, more than the "
                          f"model's context of {model.cfg.context_length}; truncate it on the left")


@torch.no_grad()
def _logits(model: GPTModel, inputs: list[tuple[int, ...]]) -> torch.Tensor:
    """One forward pass over right-padded rows: causal attention keeps the padding out of every
    real position, so each row gets the logits it would get alone."""
    rows = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)
    for row, ids in enumerate(inputs):
        rows[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return model(rows.to(model.tok_emb.weight.device))


def _tail(logits: torch.Tensor, n_inputs: int, targets: Sequence[int]) -> TailScore:
    """The score of `targets`, the tokens after the first `n_inputs - len(targets) + 1` inputs."""
    k = len(targets)
    log_probs = logits[n_inputs - k:n_inputs].float().log_softmax(dim=-1)
    want = torch.as_tensor(targets, dtype=torch.long, device=logits.device)
    chosen = log_probs.gather(1, want[:, None]).squeeze(1)
    return TailScore(chosen.cpu(), bool((log_probs.argmax(dim=-1) == want).all()))


def score_tails(model: GPTModel, requests: Sequence[tuple[Sequence[int], int]], batch_size: int = 8,
                progress: bool = False, desc: str = "scoring") -> list[TailScore]:
    """For each `(token_ids, k)`: the log-probabilities of the last `k` tokens given the ones before.

    `token_ids` may hold up to `context_length + 1` tokens (the last one is only predicted).
    Requests whose tokens before the last are the same (a question's one-token answers, repeats)
    share one row. Rows run `batch_size` at a time, longest first (less padding), on the model's
    device, without gradients; the results come back in the requests' order. Run the model in
    eval mode; `progress` shows a bar.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    sharing: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, k) in enumerate(requests):
        _check(model, seq, k)
        sharing.setdefault(tuple(int(t) for t in seq[:-1]), []).append(i)
    inputs = sorted(sharing, key=len, reverse=True)
    results: list[TailScore | None] = [None] * len(requests)
    with tqdm(total=len(requests), desc=desc, disable=not progress, unit="seq") as bar:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            logits = _logits(model, chunk)
            for row, ids in enumerate(chunk):
                for i in sharing[ids]:
                    seq, k = requests[i]
                    results[i] = _tail(logits[row], len(ids), seq[-k:])
                bar.update(len(sharing[ids]))
    return results  # type: ignore[return-value]
