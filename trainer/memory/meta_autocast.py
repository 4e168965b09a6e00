"""Autocast's casts, applied to meta tensors, which torch.autocast leaves alone.

A half-precision run computes its UNet under `accelerator.autocast()`: matmuls and convolutions cast their
inputs to the half dtype (the adapters' fp32 weights and inputs included), and on CUDA the norms cast theirs
to fp32. Which tensors the backward keeps, and in which dtype, follows from those casts, so the trace makes
them too. `autocast_casts(device_type)` swaps the torch.nn.functional functions of autocast's two lists for
ones that cast first wherever torch's CPU autocast state is on: the trace's accelerator turns that state on
around the UNet call, as the trainer's turns on CUDA's (it changes nothing for meta tensors by itself), and
gradient checkpointing restores it when it recomputes, as it does for the real step. Swapped rather than
intercepted by a TorchFunctionMode for the reason live_bytes.flash_attention gives. The lists are PyTorch's
(aten/src/ATen/autocast_mode.cpp), cut to the functions a diffusion UNet and the adapters call; CPU autocast
keeps the norms in their input's dtype, CUDA's computes them in fp32.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn import functional

_LOWER_PRECISION = ("linear", "conv1d", "conv2d", "conv3d")
_FP32 = {"cuda": ("group_norm", "layer_norm", "softmax", "log_softmax"), "cpu": ()}


@contextmanager
def autocast_casts(device_type: str = "cuda"):
    """Within: where CPU autocast is on, torch.nn.functional's matmul-like functions compute in its dtype and
    `device_type`'s fp32-list ones in fp32, as torch.autocast(device_type) would make them."""
    swapped = {name: _casting(getattr(functional, name), None) for name in _LOWER_PRECISION}
    swapped.update({name: _casting(getattr(functional, name), torch.float32) for name in _FP32[device_type]})
    originals = {name: getattr(functional, name) for name in swapped}
    try:
        for name, function in swapped.items():
            setattr(functional, name, function)
        yield
    finally:
        for name, function in originals.items():
            setattr(functional, name, function)


def _casting(function, dtype: torch.dtype | None):
    """`function` with its floating tensors cast to `dtype` (None: autocast's) first, while autocast is on."""
    def cast_first(*args, **kwargs):
        if not torch.is_autocast_enabled("cpu"):
            return function(*args, **kwargs)
        to = dtype or torch.get_autocast_dtype("cpu")
        return function(*[_cast(a, to) for a in args], **{k: _cast(v, to) for k, v in kwargs.items()})

    return cast_first


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype not in (dtype, torch.float64):
        return value.to(dtype)
    return value
