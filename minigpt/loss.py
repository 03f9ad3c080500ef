"""Cross-entropy over next-token predictions, and perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


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
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        w = weight.to(mm_dtype)  # cast once, not per chunk
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_rows):
                h, t = hidden[start:start + chunk_rows].to(mm_dtype), targets[start:start + chunk_rows]
                logits = (h @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                total += (lse.squeeze(1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if need_grad:
                    grad = logits.sub_(lse).exp_()  # softmax, in the logits' memory
                    grad[torch.arange(len(t), device=t.device), t] -= 1.0
                    grad = grad.div_(n).to(mm_dtype)
                    grad_hidden[start:start + chunk_rows] = grad @ w
                    grad_weight += grad.t() @ h
        # Kept on ctx rather than saved for backward: backward scales them in place and lets
        # them go, so the head's gradient exists once, not twice, at the peak.
        ctx.grads = (grad_hidden, grad_weight.to(weight.dtype)) if need_grad else None
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's gradients were already used: it supports one backward pass")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        return (grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight.mul_(grad_loss.to(grad_weight.dtype)),
                None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets)` for (tokens, dim) hidden states and a
    (vocab, dim) output head, computed chunk by chunk so the logits never exist whole.

    `chunk_rows` defaults to about 16M logits per chunk (64 MB in float32).
    The multiplies run in the head's own dtype, also under autocast: float32 master weights
    give float32 logits. A 50,257-way softmax over bfloat16 logits (8-bit mantissa) misstates
    the loss, and on CPUs without AMX float32 matmuls are also the faster ones (a GPT-2 124M
    bf16-autocast training step here: 2.7 s instead of 3.3 s).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected (tokens, dim) hidden states and (tokens,) targets, got "
                         f"{tuple(hidden.shape)} and {tuple(targets.shape)}")
    chunk_rows = chunk_rows or max(1, 2**24 // weight.shape[0])
    mm_dtype = weight.dtype
    # Inside `forward` autograd is off, so whether gradients are wanted is decided here.
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, mm_dtype, need_grad)
