"""A run that filled its disk: one sentence naming the folder, how much the next save needs (from the sizes of
the last checkpoint and training state on disk, or estimated from the adapters before the first) and how to
go on from the checkpoints and state that are still intact."""

from __future__ import annotations

import shutil
from pathlib import Path

from networks.atomic import DiskFull
from networks.errors import SdloraError
from trainer.run.run_dir import RunDir
from trainer.run.state import newest_complete, read_position

# accelerate's state holds the adapters in fp32 and the optimizer's two AdamW moments (and the EMA's copy).
STATE_COPIES = 3


def disk_full_error(run: RunDir, full: DiskFull, step: int, parameters: int, save_bytes: int,
                    ema: bool) -> SdloraError:
    lora = _newest_file_size(run.list_checkpoints()) or parameters * save_bytes
    state = _folder_size(run.state) or parameters * 4 * (STATE_COPIES + ema)
    needed = lora + state
    free = shutil.disk_usage(full.folder).free if full.folder.is_dir() else 0
    return SdloraError(f"No space left on device in {full.folder} while saving {full.what} at step {step}: the next "
                       f"save needs about {human_size(needed)} ({human_size(lora)} for the LoRA file, "
                       f"{human_size(state)} for the training state) and {human_size(free)} is free; free at least "
                       f"that much there and {resume_advice(run)}.")


def disk_full_outside_saving(run: RunDir) -> SdloraError:
    """The disk filled up under the run between saves (an event line, a cache file)."""
    return SdloraError(f"No space left on device in {run.root}; free space there and {resume_advice(run)}.")


def resume_advice(run: RunDir) -> str:
    saved = newest_complete(run.state)
    if saved is None:
        return "start the run again (no training state was saved yet)"
    return (f"resume with: sdlora train --resume {run.root} (every earlier checkpoint and the training state of "
            f"step {read_position(saved).step} are intact)")


def _newest_file_size(paths: list[Path]) -> int:
    for path in reversed(paths):
        try:
            return path.stat().st_size
        except OSError:
            continue
    return 0


def _folder_size(folder: Path) -> int:
    try:
        return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    except OSError:
        return 0


def human_size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if count >= scale / 10:
            return f"{count / scale:.1f} {unit}"
    return f"{max(1, round(count / 1e3))} KB"
