"""Small copies of dataset images for the gallery.

The browser never gets the dataset folder itself (it may hold anything, and 20 MP photos are slow to
show): it gets these thumbnails, written once to a private temporary folder and reused while the source
file is unchanged (the name hashes the path, size and modification time).
"""
from __future__ import annotations

import hashlib
import tempfile
import threading
from pathlib import Path

from PIL import Image, ImageOps

THUMB_SIDE = 256
PREVIEW_SIDE = 768
_folder: Path | None = None
_lock = threading.Lock()


def cache_folder() -> Path:
    global _folder
    with _lock:
        if _folder is None:
            _folder = Path(tempfile.mkdtemp(prefix="sdlora-thumbs-"))
        return _folder


def thumbnail(path: Path, side: int = THUMB_SIDE) -> Path | None:
    """A JPEG no larger than side x side showing `path`, or None when the image cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return None
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{side}".encode()).hexdigest()
    target = cache_folder() / f"{key}.jpg"
    if target.is_file():
        return target
    try:
        with Image.open(path) as image:
            image.draft("RGB", (side, side))  # JPEGs decode straight at a reduced size: much faster
            image = ImageOps.exif_transpose(image)
            image.thumbnail((side, side))
            _flatten(image).save(target.with_suffix(".tmp"), "JPEG", quality=88)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    target.with_suffix(".tmp").replace(target)
    return target


def _flatten(image: Image.Image) -> Image.Image:
    """RGB on white: JPEG has no alpha, and a transparent PNG should look as it will in a viewer."""
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
