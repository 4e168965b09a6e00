"""Max-norm regularization (kohya's `scale_weight_norms`): after each optimizer step, every module whose
change scale * B A has a Frobenius norm above `max_norm` is scaled back to it, B and A each by the
square root of the ratio. It keeps single modules from growing large enough to "fry" a LoRA at
multiplier 1 and makes files mix better.

Each adapter type measures and scales its own change (`change_norm`, `scale_change`): LoRA through the
r x r Gram matrices without building the full matrix (networks/lora.py), LoHa/LoKr from their whole change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import Adapter


@dataclass(frozen=True)
class MaxNormStats:
    keys_scaled: int  # modules scaled back at this step
    mean_norm: float  # mean ||delta W||_F after scaling
    max_norm: float  # largest ||delta W||_F after scaling


def delta_norm(adapter: Adapter) -> torch.Tensor:
    """||scale * delta W||_F in fp32 (a 0-dim tensor), for every adapter type."""
    return adapter.change_norm()


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
        adapter.scale_change(ratio)
        norms.append(norm * ratio)
        kept.append(ratio < 1.0)
    norms_after, scaled = torch.stack(norms).cpu(), torch.stack(kept).cpu()  # one transfer each
    return MaxNormStats(int(scaled.sum()), float(norms_after.mean()), float(norms_after.max()))
