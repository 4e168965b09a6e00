"""Apply the network init a config asks for, where it needs the model or data (PiSSA, LoRA-GA)."""

from __future__ import annotations

import torch

from networks.inits import apply_loraga, apply_pissa


def initialise(trainer) -> None:
    init = trainer.cfg.network.init
    if init == "pissa":
        apply_pissa(trainer.network)
    elif init == "loraga":
        apply_loraga(trainer.network, first_gradients(trainer, trainer.cfg.network.loraga_batches))


def first_gradients(trainer, num_batches: int) -> dict[str, torch.Tensor]:
    """Mean gradient of the loss w.r.t. every adapted base weight over the first batches of epoch 0
    (the adapters start at zero, so this is full fine-tuning's first gradient)."""
    adapters = dict(trainer.network.adapters.items())
    weights = {name: adapter.base.weight for name, adapter in adapters.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    batches = trainer._epoch_batches(0)[:num_batches]
    try:
        for batch in batches:
            (trainer.micro_step_loss(batch) / len(batches)).backward()
        return {name: weight.grad.detach().float().clone() for name, weight in weights.items()}
    finally:
        for weight in weights.values():
            weight.grad = None
            weight.requires_grad_(False)
        trainer.network.zero_grad(set_to_none=True)
