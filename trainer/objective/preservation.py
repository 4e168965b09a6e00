"""Output preservation without regularization images (kohya's Differential Output Preservation, ai-toolkit's
DOP): beside each step, the base model (the adapters switched off, so no second model in memory) predicts the
step's noisy latents for `train.preservation_caption` under no_grad; the adapted model predicts the same, with
gradients; the loss adds weight x their mean squared difference, so the LoRA changes only what its trigger and
captions ask for and leaves the class words' outputs where the base model had them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from networks.network import LoraNetwork
    from trainer.config import TrainConfig

# network.init values that move the base weights (base = original - B0 A0): with the adapters off the model is
# then not the base model, so there would be nothing to preserve.
MOVES_THE_BASE = ("pissa", "loraga")


def preservation_problem(cfg: TrainConfig) -> str | None:
    """The sentence refusing output preservation for this config, or None (the pre-flight and the run ask)."""
    init = cfg.network.init
    if cfg.train.preservation_caption and init in MOVES_THE_BASE:
        return (f"train.preservation_caption compares the LoRA with the base model by switching the adapters off, "
                f"but network.init {init} moves the base weights, so the model without adapters is not the base; "
                "use network.init kaiming or gaussian, or leave train.preservation_caption empty.")
    return None


@contextmanager
def adapters_off(network: LoraNetwork | None) -> Iterator[None]:
    """The base model for the duration: every adapter's forward returns its module's own output. None (the
    memory trace's BatchLoss, which has no network to hand) switches nothing: its cost is the same forward."""
    if network is None:
        yield
        return
    adapters = [adapter for _, adapter in network.items()]
    was = [adapter.enabled for adapter in adapters]
    network.set_enabled(False)
    try:
        yield
    finally:
        for adapter, enabled in zip(adapters, was):
            adapter.enabled = enabled


def preservation_loss(predict: Callable[[dict], torch.Tensor], encode: Callable[[list[str]], dict], caption: str,
                      batch_size: int, network: LoraNetwork | None, weight: float) -> torch.Tensor:
    """weight x MSE(adapted, base) for `caption` on the step's noisy latents and timesteps (`predict` closes
    over them). `encode` is the step's own caption encoder: the text cache (one entry, filled at setup) or, when
    the text encoder trains, the encoder itself, run with its adapters off for the base too."""
    captions = [caption] * batch_size
    with torch.no_grad(), adapters_off(network):
        base = predict(encode(captions))
    adapted = predict(encode(captions))
    return weight * torch.nn.functional.mse_loss(adapted.float(), base.float())
