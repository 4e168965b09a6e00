"""The run directory (docs/RUN_DIRECTORY.md): config, event log, pid file, samples, checkpoints, state.

Only the main process writes here. Every file is written atomically so a reader (the UI) or a crash
never sees half of one; events.jsonl is append-only and flushed per line.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from networks.atomic import write_text_atomic

EVENT_KINDS = ("skipped", "started", "step", "sample", "checkpoint", "validation", "load_check", "stopped", "finished",
               "error")


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    CONFIG_NAME = "config.toml"  # the file name alone, for messages and labels that name it

    config = property(lambda self: self.root / RunDir.CONFIG_NAME)
    events_path = property(lambda self: self.root / "events.jsonl")
    pid_path = property(lambda self: self.root / "trainer.pid")
    # Written by the UI, not the trainer: the launched process's stdout+stderr, and the preset it started from.
    train_log = property(lambda self: self.root / "train.log")
    preset = property(lambda self: self.root / "preset.txt")
    samples = property(lambda self: self.root / "samples")
    checkpoints = property(lambda self: self.root / "checkpoints")
    state = property(lambda self: self.root / "state")
    # A copy of the LoRA file a run continues (network.weights), so a resume never depends on the original.
    weights_copy = property(lambda self: self.root / "network-weights" / "continued.safetensors")

    def create(self) -> RunDir:
        for folder in (self.root, self.samples, self.checkpoints):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def final_file(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    def relative(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    # -- events ------------------------------------------------------------------------------
    def emit(self, event: str, **fields) -> dict:
        assert event in EVENT_KINDS, event
        record = {"event": event, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}
        with open(self.events_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return record

    def events(self) -> list[dict]:
        if not self.events_path.is_file():
            return []
        records = []
        for line in self.events_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written right now
        return records

    # -- process -----------------------------------------------------------------------------
    def write_pid(self) -> None:
        write_text_atomic(self.pid_path, str(os.getpid()))

    def clear_pid(self) -> None:
        self.pid_path.unlink(missing_ok=True)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self, name: str, step: int) -> Path:
        return self.checkpoints / f"{name}-step-{step:06d}.safetensors"

    def list_checkpoints(self) -> list[Path]:
        return sorted(self.checkpoints.glob("*-step-*.safetensors"))

    def prune_checkpoints(self, keep_last: int) -> None:
        for old in self.list_checkpoints()[:-keep_last]:
            old.unlink(missing_ok=True)

