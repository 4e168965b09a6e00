"""Aspect-ratio buckets (kohya's scheme) and the resize-then-crop that puts an image into its bucket.

Training every image at resolution x resolution crops portraits and landscapes badly; buckets keep the
pixel count near resolution^2 while letting the shape follow the image. All sizes are (width, height),
PIL's order.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

from networks.errors import SdloraError

Size = tuple[int, int]


@dataclass(frozen=True)
class BucketSpec:
    resolution: int = 512
    step: int = 64
    min_side: int | None = None  # default resolution // 2 (kohya's 256 at 512)
    max_side: int | None = None  # default resolution * 2 (kohya's 1024 at 512)
    enabled: bool = True
    no_upscale: bool = False  # kohya's bucket_no_upscale: see own_size_bucket

    @property
    def smallest(self) -> int:
        if self.min_side is not None:
            return self.min_side
        return max(self.step, self.resolution // 2 // self.step * self.step)

    @property
    def largest(self) -> int:
        return self.max_side if self.max_side is not None else self.resolution * 2

    def validate(self) -> None:
        if self.step < 8 or self.step % 8:
            raise SdloraError(f"dataset.bucket_step is {self.step}; use a multiple of 8 such as 64.")
        if self.resolution < self.step or self.resolution % self.step:
            raise SdloraError(
                f"dataset.resolution is {self.resolution}; use a multiple of {self.step} such as 512."
            )
        if self.smallest % self.step or self.largest % self.step:
            raise SdloraError(
                f"dataset.min_bucket_side and max_bucket_side ({self.smallest}, {self.largest}) "
                f"must be multiples of {self.step}."
            )
        if self.enabled and not self.step <= self.smallest <= self.resolution <= self.largest:
            raise SdloraError(
                f"dataset bucket sides must satisfy {self.step} <= min_bucket_side ({self.smallest}) "
                f"<= resolution ({self.resolution}) <= max_bucket_side ({self.largest})."
            )


def bucket_sizes(spec: BucketSpec) -> list[Size]:
    """Every (width, height) bucket, sorted; just the square when buckets are disabled."""
    spec.validate()
    square = (spec.resolution, spec.resolution)
    if not spec.enabled:
        return [square]
    max_area = spec.resolution * spec.resolution
    sizes = {square}
    # For each width, the tallest height that keeps the area within resolution^2 (kohya's rule), and
    # the same bucket rotated, so portrait and landscape get the same choices.
    for width in range(spec.smallest, spec.largest + 1, spec.step):
        height = min(spec.largest, max_area // width // spec.step * spec.step)
        if height >= spec.smallest:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def closest_bucket(image_size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest to the image's, compared in log space so that
    a 1:2 portrait and a 2:1 landscape are treated alike; ties go to the larger bucket."""
    target = math.log(image_size[0] / image_size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 9), -b[0] * b[1]))


def own_size_bucket(image_size: Size, spec: BucketSpec) -> Size:
    """kohya's bucket_no_upscale: the image's own size, scaled down (never up) to at most resolution^2 pixels
    and max_bucket_side a side, each side then cut to a multiple of the step (at least one step), so the
    picture is only ever cropped a little or shrunk, never enlarged (beyond one step for tiny images)."""
    width, height = image_size
    scale = min(1.0, math.sqrt(spec.resolution * spec.resolution / (width * height)),
                spec.largest / max(width, height))
    return tuple(max(spec.step, int(side * scale) // spec.step * spec.step) for side in (width, height))


def bucket_for(image_size: Size, spec: BucketSpec, buckets: list[Size]) -> Size:
    if spec.enabled and spec.no_upscale:
        return own_size_bucket(image_size, spec)
    return closest_bucket(image_size, buckets)


@dataclass(frozen=True)
class Placement:
    """Where an image lands in its bucket: resized to cover the bucket, then cropped.

    `crop_left_top` is in resized pixels, which is what SDXL's crop conditioning means."""

    original_size: Size
    bucket: Size
    resized_size: Size
    crop_left_top: tuple[int, int]

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        left, top = self.crop_left_top
        return left, top, left + self.bucket[0], top + self.bucket[1]

    def flipped(self) -> Placement:
        """The placement as seen in the mirrored image: the crop's left edge comes from the right."""
        left, top = self.crop_left_top
        mirrored_left = self.resized_size[0] - left - self.bucket[0]
        return Placement(self.original_size, self.bucket, self.resized_size, (mirrored_left, top))

    def sdxl_time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's add_time_ids: original (h, w), crop (top, left), target (h, w)."""
        (ow, oh), (left, top), (bw, bh) = self.original_size, self.crop_left_top, self.bucket
        return oh, ow, top, left, bh, bw


def place(image_size: Size, bucket: Size, random_crop: bool = False, rng: random.Random | None = None) -> Placement:
    """Scale so the image covers the bucket, then crop it centred or at a position drawn from `rng`."""
    (width, height), (bw, bh) = image_size, bucket
    scale = max(bw / width, bh / height)
    resized = (max(bw, round(width * scale)), max(bh, round(height * scale)))
    spare_x, spare_y = resized[0] - bw, resized[1] - bh
    if random_crop:
        rng = rng or random.Random(0)
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    return Placement(image_size, bucket, resized, (left, top))


def render(image: Image.Image, placement: Placement) -> Image.Image:
    """The bucket-sized crop of `image`, resampled once straight from the original pixels.

    PIL's `box` argument resizes only the source region behind the crop, so the picture is filtered
    once (no resize-then-crop double work) and sub-pixel offsets are respected."""
    scale_x = placement.original_size[0] / placement.resized_size[0]
    scale_y = placement.original_size[1] / placement.resized_size[1]
    left, top, right, bottom = placement.crop_box
    source_box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
    return image.resize(placement.bucket, Image.Resampling.LANCZOS, box=source_box)
