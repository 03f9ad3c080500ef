"""Everything CPU-specific, applied to a model by `optimize_for_cpu(model)`.

- Float32 products through oneDNN. PyTorch multiplies float32 matrices on the CPU with MKL,
  which on AMD processors runs its AVX2 code even where the CPU has AVX-512; oneDNN, which
  PyTorch also ships, is faster there. On AVX2-only CPUs oneDNN copies a transposed operand
  first, so a product with one (the backward pass's) stays in MKL, which reads it in place.
- bfloat16 autocast at float32's speed on a CPU without bfloat16 arithmetic (no AVX512-BF16 or
  AMX), where PyTorch multiplies bfloat16 with a generic loop: the bfloat16-rounded operands are
  multiplied in float32 and the result rounded to bfloat16, which is what bfloat16 hardware
  computes (bfloat16 in, float32 sums, bfloat16 out); the loss's head stays in float32 there.
- Explicit attention when training in bfloat16: faster on the CPU than the fused kernel's backward.
- Weights reordered into oneDNN's blocked layout for decoding (`GPTModel.decoding`).
- Weight-only int8 / bfloat16 inference, in `quantize.py` (`quantize_weights`).
- `keep_freed_memory`, the allocator setting the commands make.

Each private torch API is used behind one capability check (`onednn_available`,
`weight_packing_available`, `cpu_has_bf16_arithmetic`). Other devices keep their own kernels:
off the CPU every function here falls back to plain PyTorch.
"""

from __future__ import annotations

import os
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from ..loss import HeadProducts
from ..model import GPTModel, MultiHeadAttention, masked_softmax

# ------------------------------------------------------------------------------------------------
# capabilities


@cache
def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear op (`torch.ops.mkldnn._linear_pointwise`)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def weight_packing_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN can reorder `dtype` weights for its linear op (`_reorder_linear_weight`;
    bfloat16 also needs `_is_mkldnn_bf16_supported`)."""
    if dtype not in (torch.float32, torch.bfloat16) or not onednn_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_has_bf16_arithmetic() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX).

    Without either, bfloat16 matmuls are emulated and run slower than float32 ones.
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


@cache
def _bf16_emulated_here() -> bool:
    return not cpu_has_bf16_arithmetic()


@cache
def _avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def emulated_bf16_autocast(x: torch.Tensor) -> bool:
    """Whether bfloat16 autocast is on for `x`'s device, a CPU that only emulates bfloat16."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and _bf16_emulated_here()
            and not torch.compiler.is_compiling())


def onednn_float32(*tensors: torch.Tensor) -> bool:
    """Whether products of these tensors go through oneDNN: float32 on the CPU, oneDNN built in,
    and not inside `torch.compile` (which picks its own kernels)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and onednn_available() and not torch.compiler.is_compiling())


# ------------------------------------------------------------------------------------------------
# kernels


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` in oneDNN, no checks and no autograd; `weight` may also be one
    reordered by `pack_weights`."""
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
    # float32 += bfloat16 in place is much slower than converting first
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


class CpuHeadProducts(HeadProducts):
    """`linear_cross_entropy`'s products through `mm_nt` and `add_mm_nt_`."""

    def mm_dtype(self, weight: torch.Tensor) -> torch.dtype:
        dtype = super().mm_dtype(weight)
        if weight.device.type == "cpu" and dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu") \
                and _bf16_emulated_here():
            return weight.dtype  # emulated bfloat16 would be slower than float32 (and is less exact)
        return dtype

    def mm_nt(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mm_nt(a, b)

    def add_mm_nt_(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return add_mm_nt_(out, a, b)


# ------------------------------------------------------------------------------------------------
# the model's CPU classes: same parameters, state_dict and (within float32 rounding) numbers


class CpuLinear(nn.Linear):
    """`nn.Linear` through `linear`; inside `CpuGPTModel.decoding`, through its packed weight."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not torch.is_grad_enabled():
            if not _avx512() and self.packed.layout == torch.strided and self.packed.dtype == torch.float32:
                # Plain weights on an AVX2 CPU: MKL's product reads them as fast, without
                # oneDNN's fixed cost per call, which adds up over a decoding step's many products.
                return F.linear(x, self.packed, self.bias)
            return onednn_linear(x, self.packed, self.bias)
        return linear(x, self.weight, self.bias)


class CpuAttention(MultiHeadAttention):
    """Attention whose products follow `matmul`, explicit when training in bfloat16 on the CPU."""

    def attention_weights(self, queries: torch.Tensor, keys: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
        return masked_softmax(matmul(queries, keys.transpose(2, 3)), mask, keys.shape[-1])

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        # Training in bfloat16, torch's fused attention kernel is slower on the CPU than the
        # explicit matmul-softmax-matmul at GPT-2's context lengths (its backward above all).
        if self.training and queries.dtype == torch.bfloat16 and queries.device.type == "cpu":
            return matmul(self.dropout(self.attention_weights(queries, keys, mask)), values)
        return super().attend(queries, keys, values, mask)


def pack_weights(model: nn.Module, batch_size: int) -> dict[CpuLinear, torch.Tensor]:
    """oneDNN versions of a CPU model's linear weights for decoding `batch_size` rows.

    Decoding multiplies a few rows by every weight matrix at each step, which oneDNN does
    faster than torch's default CPU kernel, faster still with weights reordered into its
    blocked layout for bfloat16 and for 4+ rows. The reordered copies cost one more model's
    worth of memory; for one to three float32 rows the plain weights are as fast, so they are
    used as they are. Nothing is packed off the CPU, where oneDNN can't, or when the weights
    exceed a quarter of the machine's memory.
    """
    linears = [m for m in model.modules() if isinstance(m, CpuLinear)]
    if not linears or linears[0].weight.device.type != "cpu" or not weight_packing_available(linears[0].weight.dtype):
        return {}
    reorder = linears[0].weight.dtype == torch.bfloat16 or batch_size >= 4
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if reorder and nbytes > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 4:
        return {}
    return {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_size) if reorder
            else m.weight.detach() for m in linears}


class PackedWeights:
    """Switches linear layers to packed weights for the duration of each `with`; reusable, so a
    decoding loop enters it once per step and leaves the model plain between steps."""

    def __init__(self, packed: dict[CpuLinear, torch.Tensor]) -> None:
        self.packed = packed
        self._previous: list[dict[CpuLinear, torch.Tensor | None]] = []

    def __enter__(self) -> None:
        self._previous.append({m: m.packed for m in self.packed})
        for m, w in self.packed.items():
            m.packed = w

    def __exit__(self, *exc_info: object) -> None:
        for m, w in self._previous.pop().items():
            m.packed = w


class CpuGPTModel(GPTModel):
    """`GPTModel` with the CPU's loss products and weights packed for decoding."""

    head_products = CpuHeadProducts()

    def decoding(self, batch_size: int) -> PackedWeights:
        """The linear layers' no-grad products on weights packed once, now, for `batch_size` rows
        (`pack_weights`); outside the context, and with gradients on, they use the plain ones."""
        return PackedWeights(pack_weights(self, batch_size))


_CPU_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: CpuLinear, MultiHeadAttention: CpuAttention, GPTModel: CpuGPTModel}


def optimize_for_cpu(model: nn.Module) -> nn.Module:
    """Apply this backend to every fast-arithmetic `GPTModel` in `model`, in place; return `model`.

    Swaps module classes for the CPU subclasses above: the parameters and state_dict stay the
    same, and so do the numbers, within float32 rounding. A no-op off the CPU, for
    `arithmetic="tutorial"` models (the tutorial's numbers bit for bit) and when called again.
    """
    for gpt in [m for m in model.modules() if isinstance(m, GPTModel)]:
        weight = gpt.tok_emb.weight
        if weight.device.type != "cpu" or gpt.cfg.arithmetic != "fast":
            continue
        for module in gpt.modules():
            cpu_class = _CPU_CLASSES.get(type(module))
            if cpu_class is not None:
                module.__class__ = cpu_class
    return model


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    PyTorch on the CPU allocates and frees large temporaries (activations, logits, gradients)
    every step. By default glibc serves blocks over 32 MB with fresh mmaps and trims the heap,
    so each step page-faults the same memory in again, at a large share of CPU time. Disabling
    mmap-backed blocks and trimming keeps the memory mapped; peak memory is unchanged, the
    process just doesn't shrink. Returns whether the setting was applied (only on Linux with glibc).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
