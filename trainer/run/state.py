"""Training state for exact resume: accelerate's save_state (optimizer, LR schedule, adapter weights,
every RNG) plus where in the batch plan the run stands, written as one folder swapped in atomically."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from networks.errors import SdloraError


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next batch comes from
    batch: int = 0  # index of the next batch within that epoch's plan


def save_state(accelerator, folder: Path, position: Position) -> None:
    """Write to `<folder>.tmp`, then swap it in, so `folder` is always a complete state."""
    staging = folder.with_name(folder.name + ".tmp")
    previous = folder.with_name(folder.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        accelerator.save_state(str(staging))
        (staging / "trainer.json").write_text(json.dumps(asdict(position)))
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise SdloraError(f"Cannot save the training state to {staging.parent} ({error.strerror or error}); "
                          "free disk space and resume from the last checkpoint.") from None
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        folder.rename(previous)
    staging.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def load_state(accelerator, folder: Path) -> Position:
    if not (folder / "trainer.json").is_file():
        previous = folder.with_name(folder.name + ".old")  # a crash between the two renames above
        if (previous / "trainer.json").is_file():
            folder = previous
        else:
            raise SdloraError(f"No saved training state in {folder}; the run stopped before its first "
                              "checkpoint, so start it again instead of resuming.")
    accelerator.load_state(str(folder))
    return Position(**json.loads((folder / "trainer.json").read_text()))
