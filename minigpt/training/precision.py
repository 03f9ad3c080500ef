"""Numeric precision of a run: autocast, the float16 gradient scaler, TF32 on CUDA."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch

from ..backends import cpu_has_bf16_arithmetic
from ..device import DTYPES, use_fast_matmul
from ..errors import ConfigError


class Precision:
    """Float32 weights; the forward and backward under autocast to `dtype` unless it is float32.

    float16 needs CUDA for its gradient scaler; bfloat16 runs anywhere. Constructing one also
    lets CUDA's float32 matmuls use TF32.
    """

    def __init__(self, dtype: str, device: torch.device) -> None:
        self.device, self.dtype = device, DTYPES[dtype]
        use_fast_matmul(device)
        if self.dtype == torch.float16 and device.type != "cuda":
            raise ConfigError("--dtype float16 needs CUDA (its gradient scaler); use bfloat16 on the CPU")
        if self.dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16_arithmetic():
            warnings.warn("this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX): bfloat16 autocast "
                          "multiplies in float32 here (minigpt.backends.cpu), so it saves memory but no time; "
                          "--dtype float32 is as fast and more exact", stacklevel=3)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def grad_norm(self, parameters: Sequence[torch.nn.Parameter]) -> torch.Tensor | None:
        """The total norm of this rank's gradients (non-finite if any gradient is), computed once for
        the non-finite check and the clipping; None under float16, whose scaler itself skips the
        steps that overflow and unscales before it clips."""
        if self.scaler.is_enabled():
            return None
        grads = [p.grad for p in parameters if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else None

    def step(self, optimizer: torch.optim.Optimizer, parameters: Sequence[torch.nn.Parameter],
             grad_clip: float | None, norm: torch.Tensor | None) -> None:
        """Clip the (unscaled) gradients to `grad_clip` if asked, then take the optimizer step;
        `norm` is `grad_norm`'s, reused rather than computed again."""
        if grad_clip and norm is not None:
            torch.nn.utils.clip_grads_with_norm_(parameters, grad_clip, norm)
        elif grad_clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
