"""Per-pixel loss masks: train only on what matters in an image (a subject cut out, a watermark left out).

A mask is 1 where the loss counts and 0 where it does not, from either
- the image's own alpha channel ("alpha": transparent pixels are ignored; opaque images count fully), or
- a mask folder ("folder"): a grayscale image with the same stem as the training image (`cat.png` ->
  `masks/cat.png`, or `masks/10_style/cat.png` for kohya sub-folders), white = train, black = ignore; any
  size, it is stretched onto the image. Images without a mask train fully.

The mask goes through the same resize, crop and mirror as the image, then is area-averaged down to the
latent grid (8x8 pixels per latent), so a latent half covered by the subject gets weight 0.5.
`diffusion_loss(..., mask=...)` then weights the squared error per latent pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from networks.errors import SdloraError
from trainer.data.buckets import Placement, render
from trainer.data.dataset import Batch, ImageDataset, Item
from trainer.data.images import IMAGE_EXTENSIONS

MASK_SOURCES = ("none", "alpha", "folder")


def latent_mask(pixel_mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w): the HW pixel mask area-averaged onto the latent grid (h, w)."""
    return F.interpolate(pixel_mask[None, None].float(), size=latent_size, mode="area")[0]


class LossMasks:
    """Masks for training batches; latent-sized masks are kept per item (they are small)."""

    def __init__(self, dataset: ImageDataset, source: str = "alpha", folder: str | Path | None = None):
        if source not in MASK_SOURCES:
            raise SdloraError(f"The loss mask source '{source}' is unknown; use one of {', '.join(MASK_SOURCES)}.")
        if source == "folder" and (not folder or not Path(folder).is_dir()):
            raise SdloraError(f"The mask folder '{folder}' does not exist; point it at a folder of grayscale "
                              "masks named like the images.")
        self.dataset, self.source = dataset, source
        self.folder = Path(folder) if folder else None
        self._cache: dict[tuple, torch.Tensor | None] = {}

    def pixel_mask(self, item: Item, flip: bool = False, placement: Placement | None = None) -> torch.Tensor | None:
        """HW float32 in [0, 1] in the item's bucket, or None when the whole image counts."""
        if self.source == "alpha":
            return self.dataset.alpha(item, flip, placement) if item.has_alpha else None
        if self.source == "folder":  # a mask folder is made for the training images, not the reg images
            return None if item.is_reg else folder_mask(self.mask_path(item), item, flip, placement)
        return None

    def mask_path(self, item: Item) -> Path | None:
        """The mask file of an item: same relative path first (kohya sub-folders), then same stem."""
        if self.folder is None:
            return None
        try:
            relative = item.path.relative_to(self.dataset.options.folder).with_suffix("")
        except ValueError:  # a validation-folder image: only its stem can match
            relative = Path(item.path.stem)
        for stem in dict.fromkeys((relative, Path(item.path.stem))):
            for extension in IMAGE_EXTENSIONS:
                candidate = self.folder / stem.with_suffix(extension)
                if candidate.is_file():
                    return candidate
        return None

    def latent(self, item: Item, flip: bool, placement: Placement, latent_size: tuple[int, int]) -> torch.Tensor | None:
        key = (item.path, flip, placement, latent_size)
        if key not in self._cache:
            mask = self.pixel_mask(item, flip, placement)
            mask = None if mask is None else latent_mask(mask, latent_size)
            if placement != item.placement:
                return mask  # a random crop is rarely asked for twice: not worth keeping
            self._cache[key] = mask
        return self._cache[key]

    def batch(self, batch: Batch, latent_size: tuple[int, int]) -> torch.Tensor | None:
        """(B, 1, h, w) for `diffusion_loss(mask=...)`, or None when no sample of the batch has a mask."""
        if self.source == "none":
            return None
        masks = [self.latent(self.dataset.items[s.item], s.flip, s.placement, latent_size) for s in batch.samples]
        if all(m is None for m in masks):
            return None
        return torch.stack([m if m is not None else torch.ones(1, *latent_size) for m in masks])


def folder_mask(path: Path | None, item: Item, flip: bool = False,
                placement: Placement | None = None) -> torch.Tensor | None:
    """A grayscale mask file put through the item's placement: HW float32 in [0, 1]."""
    if path is None:
        return None
    placement = placement or item.placement
    try:
        with Image.open(path) as image:
            image.load()
            gray = ImageOps.exif_transpose(image).convert("L")
    except (OSError, ValueError) as error:
        raise SdloraError(f"Cannot read the mask '{path}' ({error}); save it as a grayscale PNG.") from None
    if gray.size != placement.original_size:
        gray = gray.resize(placement.original_size, Image.Resampling.BILINEAR)
    gray = render(gray, placement)
    if flip:
        gray = ImageOps.mirror(gray)
    return torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)


def missing_masks(masks: LossMasks) -> list[str]:
    """Dataset images that have no mask file (for the pre-flight report)."""
    if masks.source != "folder":
        return []
    folder = masks.dataset.options.folder
    return [item.path.relative_to(folder).as_posix() for item in masks.dataset.items
            if not item.is_reg and masks.mask_path(item) is None]
