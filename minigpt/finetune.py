"""Fine-tuning within a small machine's memory: frozen layers, frozen weights kept in bfloat16,
activation checkpointing per block, and the run's peak memory.

Full fine-tuning with AdamW keeps about 16 bytes per parameter (float32 weight, gradient and two
moments). Frozen parameters need neither gradients nor optimizer state, a frozen weight can be
stored in 2 bytes, and recomputing each block's activations in the backward pass trades one
more forward for not keeping them: that is what makes GPT-2 XL fit where it otherwise cannot.
"""

from __future__ import annotations

import resource
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError
from .model import TransformerBlock

__all__ = ["freeze", "trainable_parameters", "store_frozen_in", "LowPrecisionLinear", "checkpoint_blocks",
           "CheckpointedBlock", "peak_memory_mb"]


def freeze(model: nn.Module, trainable_blocks: int | None, train_head: bool = True,
           freeze_embeddings: bool = False) -> int:
    """Train only the last `trainable_blocks` transformer blocks, plus the final norm and the
    output head if `train_head` (None: every block); returns the number of trainable parameters.

    `freeze_embeddings` freezes the token and position embeddings (with GPT-2's tied head, the
    head too: it is the token embedding). The tutorial's classifier trains 1 block: that keeps
    most of what pretraining learned, trains fast, and is about as accurate as training
    everything on small data sets.
    """
    n_layers = len(model.trf_blocks)
    if trainable_blocks is not None and not 0 <= trainable_blocks <= n_layers:
        raise ConfigError(f"--trainable-blocks must be in [0, {n_layers}] or 'all', got {trainable_blocks}")
    model.requires_grad_(trainable_blocks is None)
    if trainable_blocks is not None:
        for module in model.trf_blocks[n_layers - trainable_blocks:]:
            module.requires_grad_(True)
        if train_head:  # a base model (minigpt.heads.GPTBaseModel) has no head
            for module in (model.final_norm, getattr(model, "out_head", None)):
                if module is not None:
                    module.requires_grad_(True)
    if freeze_embeddings:
        model.tok_emb.requires_grad_(False)
        model.pos_emb.requires_grad_(False)
    return trainable_parameters(model)


def trainable_parameters(model: nn.Module) -> int:
    """Distinct parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _UpcastLinear(torch.autograd.Function):
    """x W^T + b with W and b stored in low precision: upcast for the product, and only the
    low-precision W kept for the backward (the gradient of x; W and b are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class LowPrecisionLinear(nn.Linear):
    """A frozen `nn.Linear` whose weight and bias are stored in a low-precision dtype and
    multiplied in the input's; same names and shapes in the state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UpcastLinear.apply(x, self.weight, self.bias)


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Convert every linear layer whose parameters are all frozen to a `LowPrecisionLinear` in
    `dtype`, in place (the output head too, unless it shares the embedding); returns the bytes
    saved. Trainable parameters, norms and embeddings stay as they are."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    saved = 0
    for module in model.modules():
        if (not isinstance(module, nn.Linear) or isinstance(module, LowPrecisionLinear)
                or any(p.requires_grad for p in module.parameters()) or id(module.weight) in shared):
            continue
        module.__class__ = LowPrecisionLinear
        for name, p in list(module.named_parameters(recurse=False)):
            low = p.detach().to(dtype)
            saved += p.numel() * (p.element_size() - low.element_size())
            setattr(module, name, nn.Parameter(low, requires_grad=False))
    return saved


class CheckpointedBlock(TransformerBlock):
    """A `TransformerBlock` that keeps only its input for the backward pass and recomputes the
    rest there (while training with gradients and without a KV cache)."""

    def forward(self, x: torch.Tensor, kv_cache=None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled() and kv_cache is None):
            return super().forward(x, kv_cache, layer, mask)
        return checkpoint(super().forward, x, None, layer, mask, use_reentrant=False)


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Activation checkpointing for every transformer block of `model`, in place; return `model`."""
    for module in model.modules():
        if type(module) is TransformerBlock:
            module.__class__ = CheckpointedBlock
    return model


def peak_memory_mb(device: torch.device) -> float:
    """The run's peak memory: allocated CUDA memory on a GPU, the process's peak RSS otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
