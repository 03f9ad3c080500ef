"""Cross-entropy over next-token predictions without whole logits, and perplexity."""

from __future__ import annotations

import math

import torch

# Targets equal to this are not scored, as in `F.cross_entropy` (its default ignore_index): padding.
IGNORE_INDEX = -100


def perplexity(loss: float | torch.Tensor) -> float | torch.Tensor:
    """exp(loss): the effective number of tokens the model hesitates between."""
    return torch.exp(loss) if isinstance(loss, torch.Tensor) else math.exp(loss)


class HeadProducts:
    """The matrix products of `linear_cross_entropy`, in plain PyTorch.

    The CPU backend (`minigpt.backends.cpu`) supplies a subclass with its own kernels.
    """

    def mm_dtype(self, weight: torch.Tensor) -> torch.dtype:
        """The dtype the head multiplies in: autocast's when it is on (as `F.linear`'s), else the weight's."""
        device_type = weight.device.type
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype

    def mm_nt(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`a @ b.T` for 2-D `a` (m, k) and `b` (n, k)."""
        return a @ b.t()

    def add_mm_nt_(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`out += a @ b.T` in place, for a float32 `out` (accumulating products of any dtype)."""
        if a.dtype == out.dtype:
            return out.addmm_(a, b.t())  # accumulates into `out`: no product-sized temporary
        return out.add_(self.mm_nt(a, b).to(out.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(hidden @ weight.T, targets)) without the (tokens, vocab) logits.

    Rows are processed `chunk_rows` at a time: each chunk's logits give its share of the
    loss and, at once, of both gradients (d loss / d logits = (softmax - one_hot) / n),
    after which they are freed; `backward` only scales the stored gradients. For GPT-2's
    50,257-token vocabulary this replaces three float32 (tokens, vocab) tensors (logits,
    log-softmax and its gradient) with one chunk's worth, for the same matrix multiplies,
    which run in `mm_dtype`; the softmax runs in float32.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_rows: int, mm_dtype: torch.dtype, products: HeadProducts, need_grad: bool) -> torch.Tensor:
        ignored = targets == IGNORE_INDEX
        n = (~ignored).sum()  # a tensor: reading it on the host would wait for the device every step
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        vocab = weight.shape[0]
        # The logits' gradient chunk is written into a buffer whose rows are padded to a multiple
        # of 64: the weight-gradient multiply reads such rows faster than GPT-2's 50,257.
        grad_weight = grad_buf = None
        if need_grad:
            grad_weight = torch.zeros(vocab, weight.shape[1], device=weight.device)
            grad_buf = torch.zeros(min(chunk_rows, len(targets)), vocab + -vocab % 64, dtype=mm_dtype,
                                   device=hidden.device)
        w = weight.to(mm_dtype)  # cast once, not per chunk
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, len(targets), chunk_rows):  # every row: the ignored ones anywhere
                h, t = hidden[start:start + chunk_rows].to(mm_dtype), targets[start:start + chunk_rows]
                skip = ignored[start:start + chunk_rows, None]
                t = t.masked_fill(skip[:, 0], 0)  # any valid index; its row adds nothing below
                log_probs = torch.log_softmax(products.mm_nt(h, w), dim=-1, dtype=torch.float32)
                picked = log_probs.gather(1, t[:, None])
                total -= picked.masked_fill(skip, 0.0).sum()
                if need_grad:
                    # n * d loss / d logits = softmax - one_hot; backward applies the 1 / n.
                    grad = log_probs.exp_()
                    grad[torch.arange(len(t), device=t.device), t] -= 1.0
                    grad.masked_fill_(skip, 0.0)
                    grad = grad_buf[:len(t), :vocab].copy_(grad)
                    grad_hidden[start:start + chunk_rows] = products.mm_nt(grad, w.t())
                    products.add_mm_nt_(grad_weight, grad.t(), h.t())
        # Kept on ctx rather than saved for backward: backward scales them in place and lets
        # them go, so the head's gradient exists once, not twice, at the peak.
        ctx.grads = (grad_hidden, grad_weight.to(weight.dtype)) if need_grad else None
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
                None, None, None, None, None)


_PLAIN = HeadProducts()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None, products: HeadProducts | None = None) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets)` for (tokens, dim) hidden states and a
    (vocab, dim) output head, computed chunk by chunk so the logits never exist whole.

    As there, targets equal to `IGNORE_INDEX` (-100) are not scored and the mean is over the
    others (NaN if there are none).

    `chunk_rows` defaults to about 16M logits per chunk. The multiplies run in
    `products.mm_dtype(weight)`: the head's dtype, or autocast's when it is on (as `F.linear`
    would); the log-softmax, loss and gradient accumulation always run in float32.
    `products` supplies the matrix products (plain PyTorch by default).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected (tokens, dim) hidden states and (tokens,) targets, got "
                         f"{tuple(hidden.shape)} and {tuple(targets.shape)}")
    if chunk_rows is None:  # equal chunks of at most ~16M logits: no small, slow last chunk
        n_chunks = -(-len(targets) * weight.shape[0] // 2**24)
        chunk_rows = max(1, -(-len(targets) // max(1, n_chunks)))
    # Inside `forward` autograd is off, so whether gradients are wanted is decided here.
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    products = products or _PLAIN
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, products.mm_dtype(weight), products,
                                     need_grad)
