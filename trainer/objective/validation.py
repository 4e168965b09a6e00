"""Validation loss: the same held-out images, noise and timesteps every time, so the curve compares.

The training loss jumps around because every step draws new noise and a new timestep. Here both are fixed:
noise is drawn once (from a generator seeded by validation.seed) for every (image, timestep) pair, and the
timesteps are the configured list or an even spread ([100, 300, 500, 700, 900] for 1000 steps). So the only
thing that changes between two evaluations is the adapter's weights. The global RNGs are saved and
restored around an evaluation, so validating never changes what training draws next (exact resume holds).

The held-out images are either `validation.images` of the dataset's images (a fixed, seeded pick, taken
out of training) or every image of `validation.folder`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from networks.errors import SdloraError
from trainer.data.buckets import Placement
from trainer.data.dataset import DatasetReport, ImageDataset, Item, scan_folder
from trainer.model.family import unet_conditioning
from trainer.objective.diffusion import diffusion_loss, training_target

DEFAULT_TIMESTEP_COUNT = 5


# -- which images --------------------------------------------------------------------------------------
def held_out_indices(count: int, images: int, seed: int) -> list[int]:
    """The indices of `images` held-out items out of `count`: a fixed pick for a given seed."""
    if images <= 0:
        return []
    if images >= count:
        raise SdloraError(f"validation.images is {images} but the dataset has only {count} usable images; "
                          "hold out fewer so that some remain to train on.")
    return sorted(random.Random(f"validation:{seed}").sample(range(count), images))


def split_dataset(dataset: ImageDataset, images: int, seed: int) -> tuple[ImageDataset, list[Item]]:
    """(the dataset without the held-out items, the held-out items)."""
    # Only training images are held out (regularization images come after them and are never validated).
    held = set(held_out_indices(sum(1 for item in dataset.items if not item.is_reg), images, seed))
    if not held:
        return dataset, []
    # Items are re-numbered: the batch plan addresses items by their position.
    kept = [replace(item, index=i) for i, item in enumerate(x for x in dataset.items if x.index not in held)]
    report = _report_for(dataset.report, kept)
    return ImageDataset(dataset.options, kept, report, dataset.seed), [dataset.items[i] for i in sorted(held)]


def _report_for(report: DatasetReport, items: list[Item]) -> DatasetReport:
    counts: dict = {}
    for item in items:
        counts[item.bucket] = counts.get(item.bucket, 0) + 1
    return replace(report, bucket_counts=counts, samples_per_epoch=sum(item.repeats for item in items))


def validation_items(dataset: ImageDataset, images: int = 0, folder: str | None = None,
                     seed: int = 1234) -> tuple[ImageDataset, list[Item]]:
    """(the training dataset, the validation items) for the config's validation.images / folder."""
    if folder:
        items, _ = scan_folder(replace(dataset.options, folder=folder, reg_folder=None))  # validated as is
        return dataset, items
    return split_dataset(dataset, images, seed)


# -- when -----------------------------------------------------------------------------------------------
def even_timesteps(count: int = DEFAULT_TIMESTEP_COUNT, num_train_timesteps: int = 1000) -> list[int]:
    """The centres of `count` equal slices of [0, T): 5 of 1000 -> [100, 300, 500, 700, 900]."""
    return [(2 * i + 1) * num_train_timesteps // (2 * count) for i in range(count)]


def validation_timesteps(configured: Sequence[int] | None, num_train_timesteps: int = 1000) -> list[int]:
    if not configured:
        return even_timesteps(DEFAULT_TIMESTEP_COUNT, num_train_timesteps)
    wrong = [t for t in configured if not 0 <= t < num_train_timesteps]
    if wrong:
        raise SdloraError(f"validation.timesteps holds {wrong[0]}, outside 0..{num_train_timesteps - 1} of this "
                          "model's schedule; use values in that range.")
    return [int(t) for t in configured]


# -- the loss -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValidationSample:
    latents: torch.Tensor  # (C, h, w), scaled for the UNet (LatentCache.get gives exactly this)
    caption: str
    placement: Placement | None = None  # SDXL's size/crop conditioning; None = the latent's own square
    mask: torch.Tensor | None = None  # (1, h, w) loss mask, see trainer.loss_mask

    @property
    def conditioning_placement(self) -> Placement:
        if self.placement is not None:
            return self.placement
        size = (self.latents.shape[-1] * 8, self.latents.shape[-2] * 8)
        return Placement(size, size, size, (0, 0))


# predict(noisy latents (B, C, h, w), timesteps (B,), the batch's samples) -> the UNet's output
Predict = Callable[[torch.Tensor, torch.Tensor, list[ValidationSample]], torch.Tensor]


@dataclass
class ValidationResult:
    loss: float  # mean over every (image, timestep) pair
    per_timestep: dict[int, float]  # mean over images at each timestep: low t is detail, high t composition

    def event_fields(self, step: int) -> dict:
        return {"step": step, "loss": round(self.loss, 6),
                "per_timestep": {str(t): round(v, 6) for t, v in self.per_timestep.items()}}


class ValidationSet:
    def __init__(self, samples: list[ValidationSample], noise_scheduler, prediction_type: str,
                 timesteps: Sequence[int] | None = None, seed: int = 1234, batch_size: int = 4):
        if not samples:
            raise SdloraError("There are no validation images; set validation.images or validation.folder.")
        self.samples, self.scheduler, self.prediction_type = samples, noise_scheduler, prediction_type
        self.timesteps = validation_timesteps(timesteps, noise_scheduler.config.num_train_timesteps)
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)  # its own generator: the global RNG is never used
        self.noise = {(i, t): torch.randn(s.latents.shape, generator=generator, dtype=torch.float32)
                      for i, s in enumerate(samples) for t in self.timesteps}
        self.groups = _groups(samples, self.timesteps, batch_size)

    @torch.no_grad()
    def evaluate(self, predict: Predict, network: torch.nn.Module | None = None, device=None,
                 dtype: torch.dtype = torch.float32) -> ValidationResult:
        """The loss of `predict` over every (image, timestep) pair; `network` is put in eval mode meanwhile
        (no dropout), and every global RNG comes back exactly as it was."""
        device = torch.device(device) if device is not None else self.samples[0].latents.device
        losses: dict[tuple[int, int], float] = {}
        with _rng_untouched(device, self.seed), _eval_mode(network):
            for group in self.groups:
                losses.update(self._group_losses(group, predict, device, dtype))
        per_timestep = {t: sum(losses[i, t] for i in range(len(self.samples))) / len(self.samples)
                        for t in self.timesteps}
        return ValidationResult(sum(losses.values()) / len(losses), per_timestep)

    def _group_losses(self, group: list[tuple[int, int]], predict: Predict, device, dtype) -> dict:
        samples = [self.samples[i] for i, _ in group]
        latents = torch.stack([s.latents for s in samples]).to(device, torch.float32)
        noise = torch.stack([self.noise[key] for key in group]).to(device)
        timesteps = torch.tensor([t for _, t in group], dtype=torch.long, device=device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = predict(noisy.to(dtype), timesteps, samples)
        target = training_target(self.scheduler, latents, noise, timesteps, self.prediction_type)
        out = {}
        for row, key in enumerate(group):
            mask = samples[row].mask
            mask = None if mask is None else mask[None].to(device)
            loss = diffusion_loss(prediction[row:row + 1], target[row:row + 1], timesteps[row:row + 1],
                                  self.scheduler, self.prediction_type, None, mask)
            out[key] = float(loss)
        return out


def _groups(samples: list[ValidationSample], timesteps: list[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """(sample, timestep) pairs in batches of one latent shape (images of one bucket stack together)."""
    by_shape: dict[tuple, list[tuple[int, int]]] = {}
    for i, sample in enumerate(samples):
        by_shape.setdefault(tuple(sample.latents.shape), []).extend((i, t) for t in timesteps)
    return [pairs[k:k + batch_size] for pairs in by_shape.values() for k in range(0, len(pairs), batch_size)]


@contextlib.contextmanager
def _rng_untouched(device: torch.device, seed: int):
    """Save and restore the CPU (and this CUDA device's) RNG; inside, the RNG is seeded, so even a module
    that draws random numbers in eval mode gives the same loss every time."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _eval_mode(network: torch.nn.Module | None):
    if network is None:
        yield
        return
    was_training = network.training
    network.eval()
    try:
        yield
    finally:
        network.train(was_training)


# -- the UNet call, as the training step makes it ---------------------------------------------------------
def unet_predictor(model, encode_text: Callable[[list[str]], dict], device, dtype: torch.dtype,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Predict:
    """A `Predict` over a LoadedModel's UNet (adapters attached), encoding captions with `encode_text`."""

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, samples: list[ValidationSample]) -> torch.Tensor:
        hidden, added = unet_conditioning(model.family, encode_text([s.caption for s in samples]),
                                          [s.conditioning_placement for s in samples], device, dtype)
        with autocast():
            return model.unet(noisy.to(device, dtype), timesteps.to(device), hidden, added_cond_kwargs=added).sample

    return predict
