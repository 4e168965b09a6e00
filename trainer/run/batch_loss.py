"""One batch's training loss: its latents and caption states from the batch supply, noised and scored by the
objective through the training UNet (adapters attached). The training step calls it, and so does LoRA-GA's
gradient pass before the run's first step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.caches.supply import BatchSupply
from trainer.data.dataset import Batch, ImageDataset
from trainer.data.loss_mask import LossMasks
from trainer.model.family import unet_conditioning
from trainer.model.model_loading import LoadedModel
from trainer.objective.diffusion import Objective


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

    def __call__(self, batch: Batch) -> torch.Tensor:
        device = self.accelerator.device
        latents = self.supply.batch_latents(batch).to(self.weight_dtype)
        encoded = self.supply.encode_text([s.caption for s in batch.samples])
        hidden, added = unet_conditioning(self.model.family, encoded, [s.as_seen for s in batch.samples], device,
                                          self.weight_dtype)
        mask = self.loss_masks.batch(batch, tuple(latents.shape[-2:])) if self.loss_masks else None
        noisy, noise, timesteps = self.objective.noised(latents)
        with self.accelerator.autocast():
            prediction = self.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        return self.objective.loss(prediction, latents, noise, timesteps, None if mask is None else mask.to(device),
                                   self.prior_weights(batch))

    def prior_weights(self, batch: Batch) -> torch.Tensor | None:
        """train.prior_loss_weight for regularization samples, 1 for the rest; None when all are 1."""
        weights = [self.prior_loss_weight if self.dataset.items[s.item].is_reg else 1.0 for s in batch.samples]
        return None if all(w == 1.0 for w in weights) else torch.tensor(weights)
