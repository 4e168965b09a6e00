"""Training state for exact resume: accelerate's save_state (optimizer, LR schedule, adapter weights,
every RNG) plus where in the batch plan the run stands, written as one folder swapped in atomically.

A state is complete when its `trainer.json` is there and every file it lists has the size it lists: that
file is written last, after the others are on disk. Saving writes `state.tmp`, then renames `state` ->
`state.old`, `state.tmp` -> `state` and only then deletes `state.old`, so a crash at any point leaves at
least one complete state; resuming takes the newest complete one of the three."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from safetensors import SafetensorError

from networks.atomic import DiskFull, atomic_write, is_disk_full
from networks.errors import SdloraError

POSITION_FILE = "trainer.json"


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next batch comes from
    batch: int = 0  # index of the next batch within that epoch's plan


def staging_of(folder: Path) -> Path:
    return folder.with_name(folder.name + ".tmp")


def previous_of(folder: Path) -> Path:
    return folder.with_name(folder.name + ".old")


def save_state(accelerator, folder: Path, position: Position) -> None:
    """Write the state to `<folder>.tmp`, then swap it in: `folder` is replaced only by a complete state."""
    staging = staging_of(folder)
    _settle(folder)  # a complete state.tmp left by a crash becomes `folder` before state.tmp is reused
    shutil.rmtree(staging, ignore_errors=True)
    try:
        accelerator.save_state(str(staging))
        _write_position(staging, position)
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error):
            raise DiskFull(folder.parent, "the training state") from None
        if not isinstance(error, (OSError, RuntimeError, SafetensorError)):
            raise
        raise SdloraError(f"Cannot save the training state to {staging.parent} ({_first_line(error)}); "
                          "free disk space and resume from the last checkpoint.") from None
    _swap_in(staging, folder)


def load_state(accelerator, folder: Path) -> Position:
    """Restore the newest complete state of `folder`, `<folder>.tmp` and `<folder>.old` (a crash while saving
    leaves one of the last two)."""
    source = newest_complete(folder)
    if source is None:
        raise SdloraError(f"No saved training state in {folder}; the run stopped before its first "
                          "checkpoint, so start it again instead of resuming.")
    accelerator.load_state(str(source))
    return read_position(source)


def newest_complete(folder: Path) -> Path | None:
    """The complete state with the most steps among `folder`, its staging and its previous copy; on a tie the
    one in place."""
    complete = [candidate for candidate in (folder, staging_of(folder), previous_of(folder)) if is_complete(candidate)]
    return max(complete, key=lambda candidate: read_position(candidate).step, default=None)


def is_complete(folder: Path) -> bool:
    try:
        record = json.loads((folder / POSITION_FILE).read_text())
        return all((folder / name).stat().st_size == size for name, size in record.get("files", {}).items())
    except (OSError, ValueError, AttributeError):
        return False


def read_position(folder: Path) -> Position:
    record = json.loads((folder / POSITION_FILE).read_text())
    return Position(**{f.name: record[f.name] for f in fields(Position)})


def _write_position(staging: Path, position: Position) -> None:
    """trainer.json last, naming every file accelerate wrote (with sizes) after they are flushed to disk."""
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[path.relative_to(staging).as_posix()] = path.stat().st_size
    text = json.dumps({**asdict(position), "files": files})
    atomic_write(staging / POSITION_FILE, lambda tmp: Path(tmp).write_text(text))


def _swap_in(staging: Path, folder: Path) -> None:
    previous = previous_of(folder)
    if folder.exists():
        shutil.rmtree(previous, ignore_errors=True)  # stale: `folder` is complete and newer
        folder.rename(previous)
    staging.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def _settle(folder: Path) -> None:
    """Put the newest complete state in place as `folder` (after a crash it may be `.tmp` or `.old`)."""
    newest = newest_complete(folder)
    if newest is not None and newest != folder:
        if newest == staging_of(folder):
            _swap_in(newest, folder)
        elif not folder.exists():
            newest.rename(folder)


def _first_line(error: BaseException) -> str:
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
