"""The run directory (docs/RUN_DIRECTORY.md): config, event log, pid file, lock, samples, checkpoints, state.

Only the main process of the one trainer holding the folder's lock writes here. Every file is written
atomically so a reader (the UI) or a crash never sees half of one; events.jsonl is append-only and
flushed per line.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from networks.atomic import write_text_atomic
from networks.errors import SdloraError
from trainer.run import lock
from trainer.run.events import ErrorEvent, Event, StepEvent, parse

CHECKPOINT_STEP = "-step-"  # <name>-step-000020.safetensors: what marks a checkpoint file


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    CONFIG_NAME = "config.toml"  # the file name alone, for messages and labels that name it

    config = property(lambda self: self.root / RunDir.CONFIG_NAME)
    events_path = property(lambda self: self.root / "events.jsonl")
    pid_path = property(lambda self: self.root / "trainer.pid")
    lock_path = property(lambda self: self.root / "trainer.lock")
    # Written by the UI, not the trainer: the launched process's stdout+stderr, and the preset it started from.
    train_log = property(lambda self: self.root / "train.log")
    preset = property(lambda self: self.root / "preset.txt")
    samples = property(lambda self: self.root / "samples")
    checkpoints = property(lambda self: self.root / "checkpoints")
    state = property(lambda self: self.root / "state")
    # A copy of the LoRA file a run continues (network.weights), so a resume never depends on the original.
    weights_copy = property(lambda self: self.root / "network-weights" / "continued.safetensors")

    def create(self) -> RunDir:
        """Make the folder and take it for this process (refused while another trainer lives in it), then
        clear what killed saves left behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        if lock.acquire(self.lock_path) is None:
            raise SdloraError(f"The run folder {self.root} is in use by another training run (process "
                              f"{lock.read_pid(self.lock_path) or 'unknown'}); wait for it to finish, stop it, or "
                              "choose another --output.")
        self.remove_leftover_temporaries()
        for folder in (self.samples, self.checkpoints):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def busy(self) -> bool:
        """Whether another live process holds this folder (a trainer that is loading, training or saving)."""
        return lock.held_elsewhere(self.lock_path)

    def remove_leftover_temporaries(self) -> list[Path]:
        """Delete the `.NAME.xxxx.tmp` files of atomic writes a killed process never renamed (only safe while
        this process holds the lock: nothing else writes here then)."""
        leftovers = [path for path in self.root.rglob(".*.tmp") if path.is_file()]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return leftovers

    def final_file(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    def relative(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def write_preset(self, preset: str | None) -> None:
        """Note the preset a run started from (the Runs table's Preset column); config.toml holds the resolved
        settings, so the preset's name is known only to whoever resolved them."""
        if preset:
            write_text_atomic(self.preset, preset + "\n")

    # -- events ------------------------------------------------------------------------------
    def emit(self, event: Event) -> Event:
        """Append `event`, stamped with the time now, as one flushed line of events.jsonl."""
        event = replace(event, time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with open(self.events_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event.record()) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return event

    def events(self) -> list[Event]:
        if not self.events_path.is_file():
            return []
        events = []
        for line in self.events_path.read_text(encoding="utf-8").splitlines():
            try:
                event = parse(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written right now
            if event is not None:
                events.append(event)
        return events

    def record_error(self, message: str) -> None:
        """The `error` event of a run that failed, at its last step; not written by a process that was refused
        the folder (the run living there is someone else's)."""
        if lock.holds(self.lock_path) and self.root.is_dir():
            steps = [event.step for event in self.events() if isinstance(event, StepEvent)]
            self.emit(ErrorEvent(message=message, step=steps[-1] if steps else 0))

    # -- process -----------------------------------------------------------------------------
    def write_pid(self) -> None:
        write_text_atomic(self.pid_path, str(os.getpid()))

    def clear_pid(self) -> None:
        self.pid_path.unlink(missing_ok=True)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self, name: str, step: int) -> Path:
        return self.checkpoints / f"{name}{CHECKPOINT_STEP}{step:06d}.safetensors"

    def list_checkpoints(self) -> list[Path]:
        return sorted(self.checkpoints.glob(f"*{CHECKPOINT_STEP}*.safetensors"))

    def prune_checkpoints(self, keep_last: int) -> None:
        for old in self.list_checkpoints()[:-keep_last]:
            old.unlink(missing_ok=True)
