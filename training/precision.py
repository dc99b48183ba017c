"""Speed settings for CUDA: mixed precision and the channels_last memory layout.

Mixed precision (Micikevicius et al., 2018, "Mixed Precision Training"): the forward pass of a
training step runs under ``torch.autocast`` in bfloat16 where the GPU supports it, else in
float16 with a gradient scaler that keeps small gradients from underflowing. Conv nets train
in ``channels_last`` layout (NHWC), which tensor-core convolutions prefer. Both apply on CUDA
only: on CPU and MPS nothing changes (float32, contiguous weights), so CPU numbers never depend
on these settings. ``main.py --no-amp`` turns mixed precision off; evaluation always runs in
float32. Saved weights are always contiguous float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_amp_enabled = True


def set_amp(enabled: bool) -> None:
    """Allow mixed precision on CUDA (the default) or not (``--no-amp``), for this process."""
    global _amp_enabled
    _amp_enabled = enabled


def amp_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast type of training steps on `device`; None for float32 throughout."""
    if not _amp_enabled or torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def amp_name(device: torch.device | str) -> str | None:
    """``"bfloat16"``, ``"float16"`` or None, as sidecars and metrics.json record it."""
    dtype = amp_dtype(device)
    return None if dtype is None else str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def autocast(device: torch.device | str) -> Iterator[None]:
    """The forward pass of a training step: mixed precision on CUDA, nothing elsewhere."""
    dtype = amp_dtype(device)
    if dtype is None:
        yield
        return
    with torch.autocast("cuda", dtype=dtype):
        yield


def grad_scaler(device: torch.device | str) -> torch.amp.GradScaler | None:
    """A gradient scaler for float16 steps (bfloat16 has float32's range and needs none)."""
    if amp_dtype(device) != torch.float16:
        return None
    return torch.amp.GradScaler("cuda")


def _is_conv_net(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def channels_last(model: nn.Module, device: torch.device | str) -> bool:
    """Put a conv net on CUDA in channels_last layout; True when it did (undo it with
    :func:`contiguous` before saving: safetensors stores contiguous tensors only)."""
    if torch.device(device).type != "cuda" or not _is_conv_net(model):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def contiguous(model: nn.Module) -> None:
    model.to(memory_format=torch.contiguous_format)


def loss_accumulator(device: torch.device | str) -> torch.Tensor:
    """A zero on `device` to sum losses into without reading each one back to the host.

    float64, so that summing ``loss * batch_size`` gives exactly the float a Python sum of
    ``loss.item() * batch_size`` gives (float32 on MPS, which has no float64).
    """
    dev = torch.device(device)
    return torch.zeros((), dtype=torch.float32 if dev.type == "mps" else torch.float64, device=dev)


__all__ = [
    "amp_dtype",
    "amp_name",
    "autocast",
    "channels_last",
    "contiguous",
    "grad_scaler",
    "loss_accumulator",
    "set_amp",
]
