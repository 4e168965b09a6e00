"""Opening training images: any common mode becomes RGB, with the alpha channel kept on the side.

Photos arrive rotated by EXIF, in CMYK, as 16-bit scans, as palettes with a transparent colour or as
RGBA cut-outs; the trainer only ever wants 8-bit RGB (plus the alpha channel, which a loss mask can use).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from networks.errors import SdloraError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Transparent pixels become white, as kohya's trainer does: cut-outs on white are what people expect to
# see, and a stable colour keeps the hidden RGB of transparent pixels (often garbage) out of training.
BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class LoadedImage:
    rgb: Image.Image  # mode "RGB", EXIF orientation applied
    alpha: Image.Image | None  # mode "L" when the file had transparency, else None

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size


@dataclass(frozen=True)
class ImageInfo:
    size: tuple[int, int]  # upright, as load_image will return it
    has_alpha: bool


class UnreadableImageError(SdloraError):
    """The file has an image extension but Pillow cannot decode it."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: Path) -> LoadedImage:
    """Decode `path` fully; raise UnreadableImageError (one sentence) when it is corrupt or truncated."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now so that truncation shows up here, not mid-training
            upright = ImageOps.exif_transpose(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(
            f"Cannot read image '{path}' ({error}); re-export it as PNG or JPEG or remove it."
        ) from error
    return to_rgb(upright)


def probe_image(path: Path) -> tuple[ImageInfo | None, str | None]:
    """(info, None) or (None, reason), for scanning a folder, where bad files are reported, not raised.

    The pixels are decoded (so corrupt and truncated files show up in the pre-flight report, not
    mid-training), but JPEGs at 1/8 scale through Pillow's draft mode: several times faster on photos."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            has_alpha = _has_alpha(image)
            image.draft("RGB", (1, 1))  # a no-op for formats other than JPEG
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return None, str(error)
    size = (height, width) if orientation in _SIDEWAYS else (width, height)
    return ImageInfo(size, has_alpha), None


def to_rgb(image: Image.Image) -> LoadedImage:
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA")  # a transparent palette index or colour key (PNG tRNS)
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return LoadedImage(Image.alpha_composite(background, rgba).convert("RGB"), alpha)
    return LoadedImage(image.convert("RGB") if image.mode != "RGB" else image, None)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or ("transparency" in image.info and image.mode in ("P", "L", "RGB"))


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    # Pillow's own convert("L") clips 16-bit values at 255, which turns almost every pixel white;
    # rescale the full 0..65535 range instead.
    values = np.asarray(image, dtype=np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
