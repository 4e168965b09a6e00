"""Initialisations that start the adapter away from zero and move the base weight to compensate, so the
model's output at step 0 is unchanged: PiSSA (Meng et al. 2024) and LoRA-GA (Wang et al. 2024).

Both keep B0, A0 in the adapter; the exported file is the true change scale (B A - B0 A0), see
LoraModule.export_weights.
"""

from __future__ import annotations

import torch

from .errors import SdloraError
from .lora import LoraModule
from .network import LoraNetwork


@torch.no_grad()
def pissa_init(adapter: LoraModule) -> None:
    """B0 A0 = the top-r singular part of W / scale: the adapter trains the principal directions."""
    weight = adapter.base.weight.detach().float().flatten(1)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    r = _check_rank(adapter, weight, 1)
    root = (s[:r] / adapter.scale).sqrt()
    adapter.start_from(u[:, :r] * root, root[:, None] * vh[:r])


@torch.no_grad()
def loraga_init(adapter: LoraModule, gradient: torch.Tensor) -> None:
    """B0 = U[:, :r], A0 = V[r:2r] from the SVD of the first gradient of W, so the first steps of
    the adapter follow full fine-tuning's gradient as closely as a rank-r update can."""
    flat = gradient.detach().float().flatten(1)
    r = _check_rank(adapter, flat, 2)
    u, _, vh = torch.linalg.svd(flat, full_matrices=False)
    adapter.start_from(u[:, :r], vh[r: 2 * r])


def apply_pissa(network: LoraNetwork) -> None:
    for adapter in network.adapters.values():
        pissa_init(adapter)


def apply_loraga(network: LoraNetwork, gradients: dict[str, torch.Tensor]) -> None:
    for name, adapter in network.adapters.items():
        loraga_init(adapter, gradients[name])


def _check_rank(adapter: LoraModule, matrix: torch.Tensor, factor: int) -> int:
    if factor * adapter.rank > min(matrix.shape):
        raise SdloraError(f"Rank {adapter.rank} is too large for this init on a {tuple(matrix.shape)} weight "
                          f"(needs {factor} x r <= {min(matrix.shape)}); lower network.rank.")
    return adapter.rank
