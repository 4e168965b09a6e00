"""The one atomic writer: every file sdlora writes (LoRA files, configs, captions, samples, caches, model
folders) goes through a temporary file or folder beside it and a rename, so a reader never sees half a file and a failed write
leaves the old one. Torch-free, so the config and the CLI load fast."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import SdloraError

# How libraries that do not raise OSError say the disk is full: the OS's own words (safetensors' SafetensorError
# carries them) and torch.save's C++ stream writer, with no errno ("[enforce fail at inline_container.cc:672] .
# unexpected pos 280256 vs 280144" for a short write, or "... file write failed").
DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded")
TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "failed writing file")


class DiskFull(SdloraError):
    """A write that ran out of disk space; `folder` is where it was writing. Front doors that know more (how
    much the next save needs, how to resume) say so in their own sentence."""

    def __init__(self, folder: Path, what: str):
        super().__init__(f"No space left on device for {what} in {folder}; free space there and try again.")
        self.folder, self.what = Path(folder), what


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception chain, or a library's words for it."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if any(words in text for words in DISK_FULL_WORDS):
            return True
        if "enforce fail" in text and any(words in text for words in TORCH_WRITE_FAILED):
            return True
        error = error.__cause__ or error.__context__
    return False


def atomic_write(target: str | os.PathLike, write: Callable[[str], object], sync: bool = True) -> Path:
    """Run write(temp_path) then rename over `target`; the temp file is removed on any failure, a full disk
    raises `DiskFull` and another disk error becomes one sentence. `sync=False` skips the fsync, for files that
    are cheap to make again."""
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
    except BaseException as error:
        _remove(temporary)
        if isinstance(error, Exception) and not isinstance(error, SdloraError) and is_disk_full(error):
            raise DiskFull(target.parent, target.name) from None
        if isinstance(error, OSError):
            raise SdloraError(f"Cannot write {target} ({error.strerror or error}); check that the folder is "
                              "writable and the disk has space (a stopped run resumes from its last "
                              "checkpoint).") from None
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
