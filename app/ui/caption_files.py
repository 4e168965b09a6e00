"""Editing the caption files beside dataset images: one at a time, or all at once.

Every write is atomic (temp file + rename), so a crash mid-edit never leaves a half-written caption,
and only files next to images of the opened dataset are ever written.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from app.security import is_inside
from networks.atomic import write_text_atomic
from networks.errors import SdloraError
from trainer.data.captions import add_trigger


def caption_path(image: Path, extension: str = ".txt") -> Path:
    return image.with_suffix(extension)


def read_caption(image: Path, extension: str = ".txt") -> str | None:
    path = caption_path(image, extension)
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8-sig", errors="replace").strip()


def write_caption(image: Path, text: str, folder: Path, extension: str = ".txt") -> Path:
    if not is_inside(image, folder):
        raise SdloraError(f"{image.name} is not in the opened dataset folder; open the folder again.")
    return write_text_atomic(caption_path(image, extension), text.strip() + "\n")


def add_trigger_everywhere(images: Iterable[Path], trigger: str, folder: Path, extension: str = ".txt") -> int:
    """Put `trigger` first in every caption that lacks it (an image without a caption gets one)."""
    trigger = trigger.strip()
    if not trigger:
        raise SdloraError("Enter the trigger word to add.")
    if "," in trigger:
        raise SdloraError("A trigger word cannot contain a comma, since commas separate caption tags.")
    changed = 0
    for image in images:
        old = read_caption(image, extension) or ""
        new = add_trigger(old, trigger)
        if new != old or not caption_path(image, extension).is_file():
            write_caption(image, new, folder, extension)
            changed += 1
    return changed


def replace_everywhere(images: Iterable[Path], find: str, replace: str, folder: Path,
                       extension: str = ".txt") -> int:
    """Replace `find` with `replace` in every existing caption; returns how many files changed."""
    if not find:
        raise SdloraError("Enter the text to find.")
    changed = 0
    for image in images:
        old = read_caption(image, extension)
        if old is None or find not in old:
            continue
        write_caption(image, old.replace(find, replace), folder, extension)
        changed += 1
    return changed
