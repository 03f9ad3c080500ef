"""Weight-only quantization for inference: `quantize_weights(model, "int8" | "bfloat16")`.

Decoding reads every weight matrix once per step, so at small batches its speed is set by how
many bytes the weights take. This module stores the linear layers' weights (the output head
included) in fewer bytes while activations, LayerNorm, attention and the KV cache stay in the
model's float dtype:

- `"int8"`: symmetric per-output-channel int8, `w ~ q * scale[row]`, `scale = max|w[row]| / 127`
  (a quarter of float32's bytes).
- `"bfloat16"`: the weights rounded to bfloat16 (half of float32's bytes).

Embeddings stay as they are: a lookup reads one row per token, so they cost memory, not
bandwidth. A head tied to the token embedding gets its own quantized copy (the tie is dropped).

Products: for a few rows (decoding) on the CPU, the vectorised kernels that read the small
weights directly (`torch._weight_int8pack_mm` for int8, torch's bfloat16 product for
bfloat16), with the rows rounded to bfloat16 on the way in and the result widened back: those
kernels take bfloat16 operands (the int8 kernel's float32 path is scalar). For many rows
(prefill, evaluation) and off the CPU: the weights dequantized to the activations' dtype one tile
of output channels at a time, multiplied exactly in that dtype. The quantized layers have no
backward: training through them raises `QuantizedTrainingError`.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from ..errors import ConfigError
from ..model import GPTModel

WEIGHT_FORMATS = ("int8", "bfloat16")
FEW_ROWS = 16  # up to this many rows take the direct kernels; more amortise a dequantized tile
TILE = 1024  # output channels dequantized at a time: a float32 tile of GPT-2's widest layer fits L2


class QuantizedTrainingError(RuntimeError):
    """Backward through quantized weights: they are for inference only."""


@cache
def int8_kernel_available() -> bool:
    """Whether this torch has the CPU int8 weight-only product `torch._weight_int8pack_mm`."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        x, q, s = torch.ones(1, 32, dtype=torch.bfloat16), torch.ones(8, 32, dtype=torch.int8), torch.ones(8)
        return bool(torch._weight_int8pack_mm(x, q, s.bfloat16()).shape == (1, 8))
    except RuntimeError:  # built without the CPU kernel
        return False


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: `(q, scale)` with `weight ~ q * scale[:, None]`."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class _NoBackward(torch.autograd.Function):
    """Identity forward; a clear error instead of silently missing gradients."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return out.view_as(out)  # `x` only links `out` to the graph that needs gradients

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        raise QuantizedTrainingError("this model's weights are quantized (quantize_weights): it can run inference "
                                     "only; train or fine-tune the float32 model and quantize it afterwards")


class QuantizedLinear(nn.Module):
    """`nn.Linear` with a weight stored as int8 + per-channel scales, or as bfloat16; no backward.

    `weight` is a frozen parameter in the stored dtype (so `parameters()`, `state_dict` and
    `memory_mb` count its real bytes); `scale` (int8 only) a float32 buffer; `bias` stays float.
    """

    def __init__(self, linear: nn.Linear, fmt: str) -> None:
        super().__init__()
        if fmt not in WEIGHT_FORMATS:
            raise ConfigError(f"weight format must be one of {', '.join(WEIGHT_FORMATS)}, got {fmt!r}")
        self.format, self.in_features, self.out_features = fmt, linear.in_features, linear.out_features
        scale: torch.Tensor | None = None
        if fmt == "int8":
            weight, scale = quantize_int8(linear.weight)
        else:
            weight = linear.weight.detach().to(torch.bfloat16)
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self._scale_bf16: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"

    def dequantized(self, rows: slice = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (or output channels `rows` of it) in `dtype`."""
        w = self.weight[rows].to(dtype)
        return w if self.scale is None else w.mul_(self.scale[rows, None].to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().reshape(-1, x.shape[-1])
        if rows.shape[0] <= FEW_ROWS and x.device.type == "cpu" and self._direct_kernel():
            out = self._few_rows(rows)
        else:
            out = self._tiled(rows)
        out = out.view(*x.shape[:-1], self.out_features)
        if torch.is_grad_enabled() and x.requires_grad:
            out = _NoBackward.apply(out, x)
        return out

    def _direct_kernel(self) -> bool:
        # the int8 kernel reads the input dimension in blocks of 8 (and crashes on a remainder)
        return self.format == "bfloat16" or (int8_kernel_available() and self.in_features % 8 == 0)

    def _few_rows(self, rows: torch.Tensor) -> torch.Tensor:
        xb = rows.to(torch.bfloat16)
        if self.format == "bfloat16":
            out = xb @ self.weight.t()
        else:
            if self._scale_bf16 is None or self._scale_bf16.device != self.weight.device:
                self._scale_bf16 = self.scale.to(torch.bfloat16)
            out = torch._weight_int8pack_mm(xb, self.weight, self._scale_bf16)
        out = out.to(rows.dtype)
        return out if self.bias is None else out.add_(self.bias.to(rows.dtype))

    def _tiled(self, rows: torch.Tensor) -> torch.Tensor:
        dtype = rows.dtype if rows.dtype.is_floating_point else torch.float32
        out = rows.new_empty(rows.shape[0], self.out_features, dtype=dtype)
        x = rows.to(dtype)
        for start in range(0, self.out_features, TILE):
            tile = slice(start, min(start + TILE, self.out_features))
            torch.mm(x, self.dequantized(tile, dtype).t(), out=out[:, tile])
        return out if self.bias is None else out.add_(self.bias.to(dtype))


def _linear_children(gpt: GPTModel) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every plain linear layer (CPU subclass included) in `gpt`;
    layers wrapped by something else (a LoRA adapter) are left to their wrapper."""
    from .cpu import CpuLinear

    return [(parent, name, child) for parent in gpt.modules() for name, child in parent.named_children()
            if type(child) in (nn.Linear, CpuLinear)]


def quantize_weights(model: nn.Module, fmt: str = "int8") -> nn.Module:
    """Store every `GPTModel`'s linear weights in `model` as `fmt` ("int8" or "bfloat16"), in place;
    return `model`, in eval mode, for inference only (a backward pass raises).

    The float weights are released. Idempotent for layers already quantized; a model whose float
    dtype is not float32 is quantized too (its activations keep that dtype).
    """
    if fmt not in WEIGHT_FORMATS:
        raise ConfigError(f"weight format must be one of {', '.join(WEIGHT_FORMATS)}, got {fmt!r}")
    gpts = [m for m in model.modules() if isinstance(m, GPTModel)]
    if not gpts:
        raise ConfigError(f"quantize_weights expects a model holding a GPTModel, got {type(model).__name__}")
    for gpt in gpts:
        for parent, name, linear in _linear_children(gpt):
            setattr(parent, name, QuantizedLinear(linear, fmt))
    return model.eval()


def weight_format(model: nn.Module) -> str | None:
    """The `quantize_weights` format of `model`'s quantized layers, None if it has none."""
    return next((m.format for m in model.modules() if isinstance(m, QuantizedLinear)), None)
