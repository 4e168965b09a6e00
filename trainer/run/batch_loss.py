"""One batch's training loss: its latents and caption states from the batch supply, noised and scored by the
objective through the training UNet (adapters attached), plus output preservation's term when
train.preservation_caption is set. The training step calls it, and so does LoRA-GA's gradient pass before the
run's first step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from networks.network import LoraNetwork
from trainer.caches.supply import BatchSupply
from trainer.data.dataset import Batch, ImageDataset
from trainer.data.loss_mask import LossMasks
from trainer.model.family import unet_conditioning
from trainer.model.model_loading import LoadedModel
from trainer.objective.diffusion import Objective
from trainer.objective.preservation import preservation_loss


@dataclass(frozen=True)
class BatchLoss:
    model: LoadedModel
    unet: torch.nn.Module  # the training forward: the model's UNet, or its torch.compile wrapper
    supply: BatchSupply
    objective: Objective
    dataset: ImageDataset
    loss_masks: LossMasks | None
    prior_loss_weight: float
    accelerator: object
    weight_dtype: torch.dtype

    network: LoraNetwork | None = None  # switched off for output preservation's base prediction

    def __call__(self, batch: Batch) -> torch.Tensor:
        device = self.accelerator.device
        latents = self.supply.batch_latents(batch).to(self.weight_dtype)
        encoded = self.supply.encode_text([s.caption for s in batch.samples])
        mask = self.loss_masks.batch(batch, tuple(latents.shape[-2:])) if self.loss_masks else None
        noisy, noise, timesteps = self.objective.noised(latents)
        placements = [s.as_seen for s in batch.samples]

        def predict(states: dict) -> torch.Tensor:
            hidden, added = unet_conditioning(self.model.family, states, placements, device, self.weight_dtype)
            with self.accelerator.autocast():
                return self.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample

        loss = self.objective.loss(predict(encoded), latents, noise, timesteps,
                                   None if mask is None else mask.to(device), self.prior_weights(batch))
        train = self.objective.train
        if train.preservation_caption:
            loss = loss + preservation_loss(predict, self.supply.encode_text, train.preservation_caption,
                                            len(batch.samples), self.network, train.preservation_weight)
        return loss

    def prior_weights(self, batch: Batch) -> torch.Tensor | None:
        """train.prior_loss_weight for regularization samples, 1 for the rest; None when all are 1."""
        weights = [self.prior_loss_weight if self.dataset.items[s.item].is_reg else 1.0 for s in batch.samples]
        return None if all(w == 1.0 for w in weights) else torch.tensor(weights)
