"""Explicit device selection: no hidden global device state."""

from __future__ import annotations

import torch

# The --dtype choices of the commands.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn `auto|cpu|cuda|cuda:N|mps` into a `torch.device`, checking it exists.

    `auto` picks CUDA, then Apple's MPS, then the CPU.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} requested but only {count} CUDA device(s) exist")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise ValueError(f"device {name!r} requested but MPS is not available on this machine")
        return device
    raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def use_fast_matmul(device: torch.device) -> bool:
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores.

    TF32 keeps float32's range with a 10-bit mantissa: several times faster on Ampere and
    later, and well inside the noise of training. Nothing changes on other devices.
    Returns whether the setting was made.
    """
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch tensor to `device`: from the CPU to CUDA through pinned memory and without
    waiting for the copy, so the host prepares the next batch while the GPU computes."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
