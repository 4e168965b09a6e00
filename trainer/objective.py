"""The diffusion training objective: noise, timesteps, the target for the model's prediction type, and
the loss with optional min-SNR weighting and a per-pixel mask."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr

PREDICTION_TYPES = ("epsilon", "v_prediction")


def sample_noise(latents: torch.Tensor, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise, drawn on the CPU from the global RNG so a run reproduces on any device;
    noise offset adds a per-channel constant (helps very dark and very bright images)."""
    noise = torch.randn(latents.shape, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1)
    return noise.to(latents.device, latents.dtype)


def sample_timesteps(batch_size: int, num_train_timesteps: int, device) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch_size,)).long().to(device)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   prediction_type: str, min_snr_gamma: float | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (masked pixels ignored), min-SNR weighted, averaged over the batch."""
    error = (prediction.float() - target.float()) ** 2
    if mask is not None:
        weight = mask.to(error.dtype).expand_as(error)
        per_sample = (error * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-8)
    else:
        per_sample = error.flatten(1).mean(1)
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, min_snr_gamma, prediction_type)
    return per_sample.mean()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) as diffusers' train_text_to_image does it."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
