"""The one atomic writer: every file sdlora writes (LoRA files, configs, captions, samples, caches, model
folders) goes through a temporary file or folder beside it and a rename, so a reader never sees half a file and a failed write
leaves the old one. Torch-free, so the config and the CLI load fast."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import SdloraError


def atomic_write(target: str | os.PathLike, write: Callable[[str], object], sync: bool = True) -> Path:
    """Run write(temp_path) then rename over `target`; the temp file is removed on any failure and a disk
    error becomes one sentence. `sync=False` skips the fsync, for files that are cheap to make again."""
    target, temporary = Path(target), None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        write(temporary)
        if sync:
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, target)
    except OSError as error:
        _remove(temporary)
        raise SdloraError(f"Cannot write {target} ({error.strerror or error}); check that the folder is writable "
                          "and the disk has space (a stopped run resumes from its last checkpoint).") from None
    except BaseException:
        _remove(temporary)
        raise
    return target


def _remove(temporary: str | None) -> None:
    if temporary is not None:
        Path(temporary).unlink(missing_ok=True)


def atomic_folder(target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """The same for a folder: write(staging) in a temporary folder beside `target`, then one rename. An
    OSError propagates (callers decide: a disk error, or a parallel process that renamed its copy first)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
