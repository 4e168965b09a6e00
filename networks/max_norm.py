"""Max-norm regularization (kohya's `scale_weight_norms`): after each optimizer step, every module whose
change scale * B A has a Frobenius norm above `max_norm` is scaled back to it, B and A each by the
square root of the ratio. It keeps single modules from growing large enough to "fry" a LoRA at
multiplier 1 and makes files mix better.

The norm is taken through the r x r Gram matrices, ||B A||_F^2 = trace((B^T B)(A A^T)), so the full
out x in (x k x k) matrix is never built: that is the one part written by hand here, no library has it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import Adapter
from .lora import LoraModule


@dataclass(frozen=True)
class MaxNormStats:
    keys_scaled: int  # modules scaled back at this step
    mean_norm: float  # mean ||delta W||_F after scaling
    max_norm: float  # largest ||delta W||_F after scaling


def delta_norm(adapter: Adapter) -> torch.Tensor:
    """||scale * B A||_F in fp32 (a 0-dim tensor), for linear and conv adapters alike; a LoHa/LoKr's from its
    whole change (it is built every step anyway)."""
    if not isinstance(adapter, LoraModule):
        return adapter.delta_weight().norm()
    up = adapter.lora_up.weight.detach().float().flatten(1)  # [out, r]
    down = adapter.lora_down.weight.detach().float().flatten(1)  # [r, in * k * k]
    gram = (up.T @ up) * (down @ down.T)  # elementwise: the trace of a product of symmetric matrices
    return gram.sum().clamp(min=0).sqrt() * abs(adapter.scale)


@torch.no_grad()
def apply_max_norm(adapters: dict[str, Adapter], max_norm: float) -> MaxNormStats:
    if not adapters:
        return MaxNormStats(0, 0.0, 0.0)
    # No per-module .item(): on a GPU each would be a sync. Modules under the limit are multiplied by
    # exactly 1.0, which leaves them bit for bit unchanged.
    norms, kept = [], []
    for adapter in adapters.values():
        norm = delta_norm(adapter)
        ratio = (max_norm / norm.clamp(min=1e-30)).clamp(max=1.0)
        if isinstance(adapter, LoraModule):
            factor = ratio.sqrt()
            adapter.lora_up.weight.mul_(factor.to(adapter.lora_up.weight.dtype))
            adapter.lora_down.weight.mul_(factor.to(adapter.lora_down.weight.dtype))
        else:
            adapter.scale_change(ratio)
        norms.append(norm * ratio)
        kept.append(ratio < 1.0)
    norms_after, scaled = torch.stack(norms).cpu(), torch.stack(kept).cpu()  # one transfer each
    return MaxNormStats(int(scaled.sum()), float(norms_after.mean()), float(norms_after.max()))
