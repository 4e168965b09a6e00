"""Apply the network init a config asks for, where it needs the model or data (PiSSA, LoRA-GA)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from networks.inits import apply_loraga, apply_pissa
from networks.network import LoraNetwork

Gradients = dict[str, torch.Tensor]  # adapter name -> gradient of its base weight


def initialise(network: LoraNetwork, init: str, first_gradients: Callable[[], Gradients]) -> None:
    """`first_gradients` is only called for LoRA-GA (it runs forward and backward passes)."""
    if init == "pissa":
        apply_pissa(network)
    elif init == "loraga":
        apply_loraga(network, first_gradients())


def first_gradients(network: LoraNetwork, loss: Callable[[object], torch.Tensor], batches: Sequence) -> Gradients:
    """Mean gradient of `loss` w.r.t. every adapted base weight over `batches` (the first ones of epoch 0;
    the adapters start at zero, so this is full fine-tuning's first gradient)."""
    weights = {name: adapter.base.weight for name, adapter in network.adapters.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    try:
        for batch in batches:
            (loss(batch) / len(batches)).backward()
        return {name: weight.grad.detach().float().clone() for name, weight in weights.items()}
    finally:
        for weight in weights.values():
            weight.grad = None
            weight.requires_grad_(False)
        network.zero_grad(set_to_none=True)
