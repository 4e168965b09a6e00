"""The diffusion training objective: noise, timesteps, the target for the model's prediction type, and
the loss with optional min-SNR weighting and a per-pixel mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from trainer.objective.timesteps import sample_timesteps

if TYPE_CHECKING:
    from trainer.config import TrainSection


def sample_noise(latents: torch.Tensor, noise_offset: float = 0.0, multires_iterations: int = 0,
                 multires_discount: float = 0.3, offset_random_strength: bool = False,
                 adaptive_noise_scale: float = 0.0) -> torch.Tensor:
    """Gaussian noise, drawn on the CPU from the global RNG so a run reproduces on any device;
    noise offset adds a per-channel constant (helps very dark and very bright images), at a random
    strength per step and/or grown by each channel's |mean latent| (kohya's adaptive noise); multires
    noise adds coarser noise, as kohya does."""
    noise = torch.randn(latents.shape, dtype=torch.float32)
    if noise_offset:
        offset = torch.tensor(noise_offset)
        if offset_random_strength:
            offset = offset * torch.rand(())
        if adaptive_noise_scale:
            brightness = latents.detach().float().mean(dim=(2, 3), keepdim=True).abs().cpu()
            offset = (offset + adaptive_noise_scale * brightness).clamp_min(0)
        noise = noise + offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1)
    if multires_iterations:
        noise = multires_noise(noise, multires_iterations, multires_discount)
    return noise.to(latents.device, latents.dtype)


def multires_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """kohya's pyramid noise (Whitaker, "multi-resolution noise"): noise drawn at ever coarser random
    scales (2-4x per level), upsampled and added with weight discount^level, then rescaled to unit std.
    Hand-written: no library has it; the scale factors come from torch's RNG so resumes stay exact."""
    batch, channels, height, width = noise.shape
    noise = noise.clone()
    for level in range(1, iterations + 1):
        factor = (float(torch.rand(())) * 2 + 2) ** level
        low_h, low_w = max(1, int(height / factor)), max(1, int(width / factor))
        coarse = torch.randn(batch, channels, low_h, low_w, dtype=noise.dtype)
        noise += torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear") * discount ** level
        if low_h == 1 or low_w == 1:
            break
    return noise / noise.std()


def perturbed_input_noise(noise: torch.Tensor, gamma: float | None, random_strength: bool = False) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, kohya's ip_noise_gamma): the model sees latents noised with
    noise + gamma * extra, but is still asked for `noise`; `random_strength` draws gamma from [0, gamma)
    each step."""
    if not gamma:
        return noise
    if random_strength:
        gamma = gamma * float(torch.rand(()))
    extra = torch.randn(noise.shape, dtype=torch.float32).to(noise.device, noise.dtype)
    return noise + gamma * extra


def with_zero_terminal_snr(scheduler: DDPMScheduler) -> DDPMScheduler:
    """Zero terminal SNR (Lin et al. 2024, kohya's zero_terminal_snr): betas rescaled so the last timestep
    is pure noise (diffusers' rescale_betas_zero_snr). Its SNR would be 0, which makes min-SNR, debiased and
    v-like weights divide by zero, so alphas_cumprod[-1] is 2**-24 instead, as diffusers' Euler schedulers set it."""
    fixed = DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)
    fixed.alphas_cumprod[-1] = 2**-24
    return fixed


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


HUBER_SCHEDULES = ("snr", "exponential", "constant")


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   prediction_type: str, min_snr_gamma: float | None = None,
                   mask: torch.Tensor | None = None, debiased: bool = False, loss_type: str = "l2",
                   huber_c: float = 0.1, huber_schedule: str = "snr",
                   sample_weights: torch.Tensor | None = None, scale_v_like_noise: bool = False,
                   v_pred_like_loss: float = 0.0) -> torch.Tensor:
    """Squared error (or kohya's pseudo-Huber / smooth L1) per sample, masked pixels ignored, min-SNR and/or
    debiased-estimation weighted, times `sample_weights` (regularization images' prior loss weight),
    averaged over the batch."""
    error = pixel_loss(prediction.float(), target.float(), loss_type,
                       huber_c_per_sample(scheduler, timesteps, huber_c, huber_schedule) if loss_type != "l2" else None)
    if mask is not None:
        weight = mask.to(error.dtype).expand_as(error)
        per_sample = (error * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-8)
    else:
        per_sample = error.flatten(1).mean(1)
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, min_snr_gamma, prediction_type)
    if debiased:
        per_sample = per_sample * debiased_weights(scheduler, timesteps, prediction_type)
    if scale_v_like_noise or v_pred_like_loss:
        # kohya's SNR/(SNR+1) scale: a v-prediction loss times it weighs timesteps like an epsilon loss;
        # an epsilon loss divided by it weighs them like a v loss.
        snr = torch.clamp(compute_snr(scheduler, timesteps), max=1000).to(per_sample)
        scale = snr / (snr + 1)
        if scale_v_like_noise:
            per_sample = per_sample * scale
        if v_pred_like_loss:
            per_sample = per_sample + per_sample / scale * v_pred_like_loss
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample)
    return per_sample.mean()


def pixel_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str,
               huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise loss. Pseudo-Huber (kohya's "huber", Khrapov et al. 2024): 2c(sqrt(d^2 + c^2) - c), quadratic
    for small errors and linear for outliers; "smooth_l1" is the same without the factor c."""
    squared = (prediction - target) ** 2
    if loss_type == "l2":
        return squared
    c = huber_c.to(squared.device, squared.dtype).view(-1, *([1] * (squared.ndim - 1)))
    robust = torch.sqrt(squared + c * c) - c
    if loss_type == "huber":
        return 2 * c * robust
    if loss_type == "smooth_l1":
        return 2 * robust
    raise ValueError(f"unknown loss type {loss_type!r}")


def huber_c_per_sample(scheduler, timesteps: torch.Tensor, huber_c: float, schedule: str) -> torch.Tensor:
    """kohya's scheduled Huber parameter: "snr" (large c, near-L2, at noisy timesteps; c at clean ones),
    "exponential" (c^(t/T)) or "constant"."""
    t = timesteps.detach().cpu()
    if schedule == "constant":
        return torch.full(t.shape, float(huber_c))
    if schedule == "exponential":
        alpha = -torch.log(torch.tensor(float(huber_c))) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * t.float())
    if schedule == "snr":
        alphas_cumprod = scheduler.alphas_cumprod[t].float()
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ValueError(f"unknown huber schedule {schedule!r}")


def debiased_weights(scheduler, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2023) as kohya applies it: 1 / sqrt(SNR) (SNR capped at 1000), or
    1 / (SNR + 1) for v-prediction."""
    snr = torch.clamp(compute_snr(scheduler, timesteps), max=1000)
    return 1 / (snr + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(snr)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) as diffusers' train_text_to_image does it."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


@dataclass(frozen=True)
class Objective:
    """One run's objective, built once from `[train]` and the model's schedule: how a batch is noised and
    how the prediction is scored. The training step calls `noised` then `loss`; nothing else reads the
    dozen `[train]` keys it gathers."""

    train: TrainSection
    scheduler: DDPMScheduler
    prediction_type: str

    def noised(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, the noise the model is asked for, timesteps). The global RNG is drawn in this
        order, noise then timesteps then input perturbation, on which bit-exact resume relies."""
        train = self.train
        noise = sample_noise(latents, train.noise_offset, train.multires_noise_iterations,
                             train.multires_noise_discount, train.noise_offset_random_strength,
                             train.adaptive_noise_scale)
        timesteps = sample_timesteps(latents.shape[0], self.scheduler.config.num_train_timesteps, latents.device,
                                     train.min_timestep, train.max_timestep, train)
        seen = perturbed_input_noise(noise, train.ip_noise_gamma, train.ip_noise_gamma_random_strength)
        return self.scheduler.add_noise(latents, seen, timesteps), noise, timesteps

    def loss(self, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             mask: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        train, kind = self.train, self.prediction_type
        target = training_target(self.scheduler, latents, noise, timesteps, kind)
        return diffusion_loss(prediction, target, timesteps, self.scheduler, kind, train.min_snr_gamma, mask=mask,
                              debiased=train.debiased_estimation, loss_type=train.loss_type, huber_c=train.huber_c,
                              huber_schedule=train.huber_schedule, sample_weights=sample_weights,
                              # kohya refuses each of these two for the other prediction type
                              scale_v_like_noise=train.scale_v_pred_loss_like_noise_pred and kind == "v_prediction",
                              v_pred_like_loss=train.v_pred_like_loss if kind == "epsilon" else 0.0)
