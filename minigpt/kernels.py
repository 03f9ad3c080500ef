"""Float32 matrix products on the CPU through oneDNN.

PyTorch multiplies float32 matrices on the CPU with MKL, which on AMD processors runs its
AVX2 code even where the CPU has AVX-512: on a 2-core AVX-512 EPYC it reaches ~210 GFLOP/s
where oneDNN, which PyTorch also ships, reaches ~450 on GPT-2's shapes (and ~2.5x MKL's rate
for one-row products while decoding). On AVX2-only CPUs the two are closer: oneDNN is ~1.3x
faster on row-major operands, but it copies a transposed operand first, so there a product
with one (the backward pass's) runs faster in MKL, which reads it in place. On Intel CPUs
the two are about even. bfloat16 products already go through oneDNN, and other devices keep
their own kernels: there `mm_nt` and `linear` are plain `a @ b.T` and `F.linear`.

Under bfloat16 autocast on a CPU without bfloat16 arithmetic (no AVX512-BF16 or AMX), PyTorch
multiplies bfloat16 matrices with a generic loop: 1-6 GFLOP/s on a 2-core AVX2 EPYC, against
40-70 in float32. There `linear` and `matmul` multiply the bfloat16-rounded operands in float32
and round the result to bfloat16: what bfloat16 hardware computes (bfloat16 in, float32 sums,
bfloat16 out), at float32's speed.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from .device import cpu_has_bf16_arithmetic


@cache
def _onednn_built_in() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@cache
def _bf16_emulated_here() -> bool:
    return not cpu_has_bf16_arithmetic()


def emulated_bf16_autocast(x: torch.Tensor) -> bool:
    """Whether bfloat16 autocast is on for `x`'s device, a CPU that only emulates bfloat16."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and _bf16_emulated_here()
            and not torch.compiler.is_compiling())


@cache
def _avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def onednn_float32(*tensors: torch.Tensor) -> bool:
    """Whether products of these tensors go through oneDNN: float32 on the CPU, oneDNN built in,
    and not inside `torch.compile` (which picks its own kernels)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and _onednn_built_in() and not torch.compiler.is_compiling())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` in oneDNN, no checks and no autograd; `weight` may also be one
    reordered by `torch.ops.mkldnn._reorder_linear_weight` (see `minigpt.generate.pack_linears`)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b.T` for 2-D `a` (m, k) and `b` (n, k), of any strides."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"cannot multiply {tuple(a.shape)} @ {tuple(b.shape)}.T")
    if onednn_float32(a, b) and (_avx512() or (a.is_contiguous() and b.is_contiguous())):
        return onednn_linear(a, b)
    return a @ b.t()


def add_mm_nt_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`out += a @ b.T` in place, for a float32 `out` (accumulating products of any dtype)."""
    if a.dtype == out.dtype and not (onednn_float32(a, b) and _avx512()):
        return out.addmm_(a, b.t())  # MKL accumulates into `out`: no product-sized temporary
    # float32 += bfloat16 in place is ~10x slower than converting first
    return out.add_(mm_nt(a, b).to(out.dtype))


class _Linear(torch.autograd.Function):
    """`x @ weight.T + bias` with the forward and both backward products in oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = onednn_linear(rows, weight, bias)
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        rows, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = mm_nt(grad_rows, weight.t()).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = mm_nt(grad_rows.t(), rows.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0)
        return grad_x, grad_w, grad_b


def _round_bf16(t: torch.Tensor) -> torch.Tensor:
    """`t`'s values rounded to bfloat16, held in float32."""
    return t.to(torch.bfloat16).float()


class _Bf16Linear(torch.autograd.Function):
    """Autocast's bfloat16 `F.linear` (operands, result and gradients rounded to bfloat16),
    multiplied in float32. Saves the bfloat16 operands, as autocast does."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # or the float32 products would be cast back down
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        w = weight.to(torch.bfloat16)
        out = mm_nt(rows.float(), w.float())
        if bias is not None:
            out += _round_bf16(bias)
        ctx.save_for_backward(rows, w)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.to(torch.bfloat16).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        rows, w = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_rows = grad.reshape(-1, grad.shape[-1]).to(torch.bfloat16)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = mm_nt(grad_rows.float(), w.float().t()).to(torch.bfloat16).to(x_dtype)
            grad_x = grad_x.view(*grad.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = mm_nt(grad_rows.t().float(), rows.t().float()).to(torch.bfloat16).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN for float32 on the CPU, and at float32's speed under bfloat16
    autocast on a CPU that would emulate bfloat16 (autocast decides as usual elsewhere)."""
    if emulated_bf16_autocast(x):
        return _Bf16Linear.apply(x, weight, bias)
    if torch.is_autocast_enabled(x.device.type) or not onednn_float32(x, weight):
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b`; under bfloat16 autocast on a CPU that would emulate bfloat16, the bfloat16
    operands are multiplied in float32 and the result rounded to bfloat16."""
    if not emulated_bf16_autocast(a):
        return a @ b
    with torch.autocast("cpu", enabled=False):
        return (_round_bf16(a) @ _round_bf16(b)).to(torch.bfloat16)
