"""Where the arithmetic runs, and on a GPU the settings that make it fast.

On CUDA a site computes in bfloat16 where the GPU supports it (float16 with loss scaling where it
does not), keeps images in channels-last layout (what cuDNN's convolutions prefer) and copies
batches from pinned memory without blocking. On the CPU nothing changes: float32, the default
layout, plain copies. Every DataLoader and forward pass in medfed takes its settings from here,
so one place decides them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def pick_device(preference: str) -> torch.device:
    """"auto" takes the GPU when the machine has one, the CPU otherwise."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast precision on `device`; None: full precision (the CPU)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, *, enabled: bool = True):
    dtype = amp_dtype(device)
    if dtype is None or not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def needs_loss_scaling(device: torch.device, *, enabled: bool = True) -> bool:
    """float16's narrow range underflows small gradients without it; bfloat16's does not."""
    return enabled and amp_dtype(device) == torch.float16


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cuda":
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def place_batch(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        layout = torch.channels_last if batch.dim() == 4 else torch.preserve_format
        return batch.to(device, memory_format=layout, non_blocking=True)
    return batch.to(device)


def loader_options(device: torch.device) -> dict:
    """DataLoader settings: pinned host memory feeds non-blocking copies to a GPU."""
    return {"pin_memory": device.type == "cuda"}
