"""VAE latents of the training images, encoded once and reused across epochs, runs and resumes.

A latent is keyed by everything that determines it: the image file's bytes (sha256, so an edited image
is re-encoded and a renamed one is not), its bucket, crop and flip, and the VAE's identity. The cache
stores raw VAE output; `get` returns latents already scaled for the UNet.

Only each item's own (centred) crop is stored. A per-epoch random crop is encoded when asked for and
not kept: it will rarely be asked for again, so storing it would only grow memory and disk.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from networks.atomic import atomic_write
from trainer.data.buckets import Placement
from trainer.data.dataset import Batch, ImageDataset, Item

# Bump when resizing/cropping/normalising changes, so old cache files stop matching.
PIXEL_PIPELINE_VERSION = "1"
ENCODE_BATCH = 4  # images of one bucket per VAE encode, unless memory is tight (the memory model reads it too)


def vae_identity(vae, source: str) -> str:
    """A string naming the VAE: where it came from, its config, and the dtype it encodes in."""
    config = json.dumps(dict(vae.config), sort_keys=True, default=str)
    return f"{source}|{hashlib.sha256(config.encode()).hexdigest()[:16]}|{vae.dtype}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def scale_latents(raw: torch.Tensor, vae_config) -> torch.Tensor:
    """The VAE's posterior as the UNet expects it: shifted (SD3-style VAEs) and scaled."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (raw - shift) * vae_config.scaling_factor


class LatentCache:
    def __init__(
        self,
        vae,
        dataset: ImageDataset,
        vae_id: str,
        folder: Path | None = None,
        batch_size: int = ENCODE_BATCH,
        keep_in_memory: bool = True,
    ):
        self.vae, self.dataset, self.vae_id, self.batch_size = vae, dataset, vae_id, batch_size
        self.folder = Path(folder) if folder is not None else None
        # Without a folder, memory is the only store; with one, big datasets can read latents from disk.
        self.keep_in_memory = keep_in_memory or self.folder is None
        self.encode_count = 0  # images actually run through the VAE by this object
        self._memory: dict[str, torch.Tensor] = {}
        self._hashes: dict[Path, str] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def key(self, item: Item, flip: bool = False, placement: Placement | None = None) -> str:
        placement = placement or item.placement
        parts = [
            PIXEL_PIPELINE_VERSION,
            self._content_hash(item.path),
            placement.bucket,
            placement.resized_size,
            placement.crop_box,
            bool(flip),
            self.vae_id,
        ]
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    def build(self, items: Iterable[Item] | None = None, flips: Iterable[bool] | None = None) -> int:
        """Encode whatever is missing, `batch_size` images of one bucket at a time; returns how many.

        Defaults: every item, and both mirror images when the dataset flips."""
        items = self.dataset.items if items is None else list(items)
        wanted = [(item, flip) for item in items for flip in self._flips(flips)]
        missing = [(item, flip) for item, flip in wanted if self._lookup(self.key(item, flip)) is None]
        by_bucket: dict[tuple[int, int], list[tuple[Item, bool, Placement]]] = {}
        for item, flip in missing:
            by_bucket.setdefault(item.bucket, []).append((item, flip, item.placement))
        for group in by_bucket.values():
            start = 0
            while start < len(group):
                chunk = group[start : start + self.batch_size]
                try:
                    self._encode(chunk)
                except torch.cuda.OutOfMemoryError:
                    if self.batch_size == 1:
                        raise
                    # The card is tighter than predicted: fewer images per encode, down to one; the latents
                    # are the same (each image is encoded on its own within a batch).
                    self.batch_size //= 2
                    torch.cuda.empty_cache()
                    continue
                start += len(chunk)
        return len(missing)

    def entries(self, items: Iterable[Item], flips: Iterable[bool] | None = None) -> dict[str, torch.Tensor]:
        """{key: raw latent} of these items as stored (what `add` takes in another process)."""
        keys = [self.key(item, flip) for item in items for flip in self._flips(flips)]
        return {key: latent for key in keys if (latent := self._lookup(key)) is not None}

    def _flips(self, flips: Iterable[bool] | None) -> tuple[bool, ...]:
        """The mirror images wanted: as given, or both when the dataset flips."""
        if flips is not None:
            return tuple(flips)
        return (False, True) if self.dataset.options.flip else (False,)

    def add(self, entries: dict[str, torch.Tensor]) -> None:
        """Take latents another process encoded (keys name content, crop and VAE, so they are valid here)."""
        for key, latent in entries.items():
            self._memory.setdefault(key, latent)

    def get(self, item: Item, flip: bool = False, placement: Placement | None = None) -> torch.Tensor:
        """CHW latents of the item, already scaled (and shifted) as the UNet expects; encodes on a miss."""
        placement = placement or item.placement
        raw = self._lookup(self.key(item, flip, placement)) if placement == item.placement else None
        if raw is None:
            raw = self._encode([(item, flip, placement)])[0]
        return scale_latents(raw, self.vae.config)

    def get_batch(self, batch: Batch) -> torch.Tensor:
        """(B, C, h, w) scaled latents of a batch, each sample with its own crop and flip."""
        return torch.stack([self.get(self.dataset.items[s.item], s.flip, s.placement) for s in batch.samples])

    @torch.no_grad()
    def _encode(self, requests: list[tuple[Item, bool, Placement]]) -> list[torch.Tensor]:
        pixels = torch.stack([self.dataset.pixels(item, flip, placement) for item, flip, placement in requests])
        pixels = pixels.to(device=self.vae.device, dtype=self.vae.dtype)
        # The posterior mean, not a sample: the cached latent is then the one deterministic encoding of
        # the image (reproducible across cache rebuilds, resumes and machines), and the SD VAE's posterior
        # std is so small that sampling would add no useful augmentation anyway.
        latents = self.vae.encode(pixels).latent_dist.mode().float().cpu()
        self.encode_count += len(requests)
        for (item, flip, placement), latent in zip(requests, latents):
            if placement == item.placement:
                self._store(self.key(item, flip), latent.clone(memory_format=torch.contiguous_format))
        return list(latents)

    def _lookup(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        if self.folder is None:
            return None
        path = self.folder / f"{key}.safetensors"
        try:
            latent = load_file(path)["latents"]
        except (FileNotFoundError, SafetensorError, KeyError):
            return None  # absent or damaged: encode again
        if self.keep_in_memory:
            self._memory[key] = latent
        return latent

    def _store(self, key: str, latent: torch.Tensor) -> None:
        if self.keep_in_memory:
            self._memory[key] = latent
        if self.folder is not None:
            atomic_save({"latents": latent}, self.folder / f"{key}.safetensors")

    def _content_hash(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = file_sha256(path)
        return self._hashes[path]


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Written beside `path`, then renamed: readers (and other ranks) never see half a file. Not synced:
    a cache entry lost to a power cut is just encoded again (a damaged file reads as a miss), and syncing
    thousands of small files would slow the build."""
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata), sync=False)
