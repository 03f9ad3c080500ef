"""LoRA, written out: a frozen linear layer plus a trainable low-rank update.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r)

B starts at zero, so a model with fresh adapters computes exactly what its base computes; only
A and B (r * (in + out) numbers per layer instead of in * out) are trained. `merge_lora` folds
B A into W afterwards, leaving a plain model. See the "LLMs from scratch" book's appendix E and
Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["LoRALinear", "LoRAConfig", "LORA_TARGETS", "apply_lora", "merge_lora", "has_lora", "mark_trainable",
           "weights_fingerprint"]

# Which linear layers each --lora-targets name adapts, by their attribute names in the model.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("W_query", "W_key", "W_value", "out_proj"),
    "mlp": ("layers.0", "layers.2"),
}
LORA_TARGETS["all"] = LORA_TARGETS["attn"] + LORA_TARGETS["mlp"]


class LoRALinear(nn.Module):
    """`base` (an `nn.Linear`, frozen) plus the low-rank update `scale * B @ A`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device))
        # A as nn.Linear initialises its weight; B = 0 keeps the model unchanged at step 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((self.dropout(x) @ self.lora_A.T) @ self.lora_B.T)

    def merged(self) -> nn.Linear:
        """A plain float32 `nn.Linear` computing what this layer computes (without dropout)."""
        base = self.base
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device)
        with torch.no_grad():
            delta = self.lora_B.float() @ self.lora_A.float()
            linear.weight.copy_(base.weight.float() + self.scale * delta)
            if base.bias is not None:
                linear.bias.copy_(base.bias.float())
        return linear


@dataclass
class LoRAConfig:
    """How a model's adapters were made, and on top of which base weights (saved with them)."""

    rank: int
    alpha: float
    targets: list[str] = field(default_factory=lambda: ["attn"])
    dropout: float = 0.0
    base: str | None = None  # what `from_pretrained` reads the base from
    base_sha256: str | None = None  # `weights_fingerprint` of the base, checked on load

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def layer_names(self) -> tuple[str, ...]:
        names: list[str] = []
        for target in self.targets:
            if target not in LORA_TARGETS:
                raise ConfigError(f"--lora-targets: unknown target {target!r}; choose from "
                                  f"{', '.join(LORA_TARGETS)}")
            names += [n for n in LORA_TARGETS[target] if n not in names]
        return tuple(names)

    def check(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"--lora-rank must be positive, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        self.layer_names()


def _targets(model: nn.Module, names: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every transformer-block linear whose local name is in `names`."""
    found = []
    for block_name, block in model.named_modules():
        if not block_name.startswith("trf_blocks.") or block_name.count(".") != 1:
            continue
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and name.split(".", 1)[-1] in names:
                parent_name, _, attr = name.rpartition(".")
                found.append((block.get_submodule(parent_name), attr, module))
    return found


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replace the targeted linears of `model`'s blocks by `LoRALinear`s, in place; return `model`.

    Only the new A and B matrices require gradients in the replaced layers; call
    `minigpt.freeze` first to freeze the rest. `model.lora_config` records `config`.
    """
    config.check()
    if has_lora(model):
        raise ConfigError("the model already has LoRA adapters; merge_lora(model) first to add new ones")
    layers = _targets(model, config.layer_names())
    if not layers:
        raise ConfigError(f"--lora-targets {','.join(config.targets)}: no such layers in the model")
    for parent, attr, linear in layers:
        setattr(parent, attr, LoRALinear(linear, config.rank, config.alpha, config.dropout))
    model.lora_config = config
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (float32), in place: a plain model that computes
    what the adapted one computes; return `model`."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, attr, child.merged())
    model.__dict__.pop("lora_config", None)
    return model


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's tensors (names, dtypes, shapes, bytes): what a LoRA checkpoint's base
    must match."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy())  # hashed in place, no copy of the bytes
    return digest.hexdigest()


def mark_trainable(model: nn.Module) -> None:
    """The adapters train, the layers they adapt stay frozen (after any `freeze`)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.base.requires_grad_(False)
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
