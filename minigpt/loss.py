"""Cross-entropy over next-token predictions, and perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .device import cpu_has_bf16_arithmetic
from .kernels import add_mm_nt_, mm_nt


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device | str) -> torch.Tensor:
    """Mean cross-entropy of the model's predictions for one batch of (inputs, targets)."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader: Iterable, model: nn.Module, device: torch.device | str,
                     num_batches: int | None = None) -> float:
    """Average `calc_loss_batch` over the first `num_batches` batches (all by default).

    An empty loader gives NaN, as in the tutorial.
    """
    n_available = len(data_loader)  # type: ignore[arg-type]
    if n_available == 0:
        return float("nan")
    num_batches = n_available if num_batches is None else min(num_batches, n_available)
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total / num_batches


def perplexity(loss: float | torch.Tensor) -> float | torch.Tensor:
    """exp(loss): the effective number of tokens the model hesitates between."""
    return torch.exp(loss) if isinstance(loss, torch.Tensor) else math.exp(loss)



class _LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(hidden @ weight.T, targets)) without the (tokens, vocab) logits.

    Rows are processed `chunk_rows` at a time: each chunk's logits give its share of the
    loss and, at once, of both gradients (d loss / d logits = (softmax - one_hot) / n),
    after which they are freed; `backward` only scales the stored gradients. For GPT-2's
    50,257-token vocabulary this replaces three float32 (tokens, vocab) tensors (logits,
    log-softmax and its gradient: 1.2 GB at 2,048 tokens) with one chunk's worth, for the
    same matrix multiplies, which run in `mm_dtype`; the softmax runs in float32.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_rows: int, mm_dtype: torch.dtype, need_grad: bool) -> torch.Tensor:
        n = targets.numel()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        w = weight.to(mm_dtype)  # cast once, not per chunk
        vocab = weight.shape[0]
        # The logits' gradient chunk and the float32 weight gradient it accumulates into are
        # padded to a multiple of 64 rows of vocabulary: that multiply runs 20-30% faster on
        # 50,304 than on GPT-2's 50,257.
        padded_vocab = vocab + -vocab % 64
        grad_weight = grad_buf = None
        if need_grad:
            grad_weight = torch.zeros(padded_vocab, weight.shape[1], device=weight.device)
            grad_buf = torch.zeros(min(chunk_rows, n), padded_vocab, dtype=mm_dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_rows):
                h, t = hidden[start:start + chunk_rows].to(mm_dtype), targets[start:start + chunk_rows]
                log_probs = torch.log_softmax(mm_nt(h, w), dim=-1, dtype=torch.float32)
                total -= log_probs.gather(1, t[:, None]).sum()
                if need_grad:
                    # n * d loss / d logits = softmax - one_hot; backward applies the 1 / n.
                    grad = log_probs.exp_()
                    grad[torch.arange(len(t), device=t.device), t] -= 1.0
                    padded = grad_buf[:len(t)]
                    grad = padded[:, :vocab].copy_(grad)
                    grad_hidden[start:start + chunk_rows] = mm_nt(grad, w.t())
                    add_mm_nt_(grad_weight, padded.t(), h.t())
        if need_grad:
            # Drop the padding rows in place rather than return a view of them: autograd adds a
            # tied embedding's gradient into a plain tensor in place, but to a view only by
            # allocating a third (vocab, dim) tensor for the sum (154 MB more at the peak on
            # GPT-2 124M, and 2.5-9x the time of the in-place add).
            grad_weight = grad_weight.resize_(vocab, weight.shape[1]).to(weight.dtype)
        # Kept on ctx rather than saved for backward: backward scales them in place and lets
        # them go, so the head's gradient exists once, not twice, at the peak.
        ctx.grads = (grad_hidden, grad_weight) if need_grad else None
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's gradients were already used: it supports one backward pass")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        scale = grad_loss / ctx.n
        return (grad_hidden.mul_(scale.to(grad_hidden.dtype)), grad_weight.mul_(scale.to(grad_weight.dtype)),
                None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets)` for (tokens, dim) hidden states and a
    (vocab, dim) output head, computed chunk by chunk so the logits never exist whole.

    `chunk_rows` defaults to about 16M logits per chunk (64 MB in float32).
    The multiplies run in the head's dtype, or in autocast's when it is on (as `F.linear`
    would), except bfloat16 on a CPU that would only emulate it; the log-softmax, loss and
    gradient accumulation always run in float32.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected (tokens, dim) hidden states and (tokens,) targets, got "
                         f"{tuple(hidden.shape)} and {tuple(targets.shape)}")
    if chunk_rows is None:  # equal chunks of at most ~16M logits: no small, slow last chunk
        n_chunks = -(-len(targets) * weight.shape[0] // 2**24)
        chunk_rows = max(1, -(-len(targets) // max(1, n_chunks)))
    device_type = hidden.device.type
    mm_dtype = weight.dtype
    if torch.is_autocast_enabled(device_type):
        mm_dtype = torch.get_autocast_dtype(device_type)
        if device_type == "cpu" and mm_dtype == torch.bfloat16 and not cpu_has_bf16_arithmetic():
            mm_dtype = weight.dtype  # emulated bfloat16 would be slower than float32 (and is less exact)
    # Inside `forward` autograd is off, so whether gradients are wanted is decided here.
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, mm_dtype, need_grad)
