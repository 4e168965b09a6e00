"""The UI's reading side of the run-directory contract (docs/RUN_DIRECTORY.md): the runs in a runs folder,
each as its events say (trainer/run/status.py) plus what only the disk and the process table know: which
files exist, whether the trainer lives, what it printed before it died. It never writes."""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from app.security import run_folder
from trainer.run import status as run_status
from trainer.run.events import Event, LoadCheckEvent, StartedEvent, parse
from trainer.run.lock import read_pid
from trainer.run.run_dir import RunDir
from trainer.run.status import ACTIVE, Process, RunProgress

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

LOG_TAIL_BYTES = 64 * 1024
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colours and cursor moves from progress bars


@dataclass(frozen=True)
class RunInfo:
    """One run as the UI lists it."""

    path: Path
    name: str
    status: str  # one of trainer.run.status.STATUSES
    step: int
    total_steps: int | None
    created: datetime
    message: str = ""  # the error sentence, when there is one
    final_file: Path | None = None  # only a file that passed its load check (or predates load checks)
    final_check: LoadCheckEvent | None = None  # the load check of the final file, when there is one
    final_loss: float | None = None  # the last logged training loss
    train_seconds: float | None = None  # time spent training, summed over its segments (a resume adds one)
    history: tuple[tuple[str, int], ...] = ()  # (lifecycle event, step) in order: started, stopped, started...
    preset: str | None = None  # the preset the run started from, when it was noted

    @property
    def resumed(self) -> int:
        """How many times the run continued from a checkpoint."""
        return run_status.resumed(self.history)

    @property
    def folder(self) -> str:
        return self.path.name

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


@dataclass
class Progress(RunProgress):
    """What the live view shows for one run, all read from its folder: the events' progress with its sample
    paths made absolute (files that exist only), and what the folder adds."""

    info: RunInfo | None = None
    validating: bool = False  # the config measures validation loss (its curve is expected)
    checkpoints: list[Path] = field(default_factory=list)
    ema_file: Path | None = None  # the EMA weights' export, when the run used EMA
    event_count: int = 0


class EventLog:
    """Incremental reader of one events.jsonl: each read parses only the complete lines appended since."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._reset(None)

    def _reset(self, inode) -> None:
        self._inode, self._offset, self._events = inode, 0, []

    def read(self) -> list[Event]:
        with self._lock:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                self._reset(None)
                return []
            if stat.st_ino != self._inode or stat.st_size < self._offset:
                self._reset(stat.st_ino)  # the file was replaced or truncated
            if stat.st_size > self._offset:
                self._read_new()
            return list(self._events)

    def _read_new(self) -> None:
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return  # a line still being written; read it whole next time
        for line in chunk[:end].splitlines():
            try:
                event = parse(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # never let one damaged line hide a run
            if event is not None:
                self._events.append(event)
        self._offset += end + 1


@dataclass
class Launched:
    """A trainer process this UI started, and how many `started` events its run had before it."""

    process: subprocess.Popen
    started_before: int


class RunList:
    """Lists and reads the runs in one runs folder; `launched` is filled by whoever starts trainers here."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.launched: dict[Path, Launched] = {}
        self._logs: dict[Path, EventLog] = {}
        self._lock = threading.Lock()

    def resolve(self, run: str | Path) -> Path:
        return run_folder(self.runs_dir, run)

    def events(self, run_dir: Path) -> list[Event]:
        with self._lock:
            log = self._logs.setdefault(run_dir, EventLog(RunDir(run_dir).events_path))
        return log.read()

    def forget(self, run_dir: Path) -> None:
        with self._lock:
            self._logs.pop(run_dir, None)
            self.launched.pop(run_dir, None)

    def list_runs(self) -> list[RunInfo]:
        """Every run in the runs folder, newest first."""
        runs = [self.info(p) for p in self.runs_dir.iterdir() if _is_run(p)]
        return sorted(runs, key=lambda r: (r.created, r.folder), reverse=True)

    def newest_active(self) -> RunInfo | None:
        return next((r for r in self.list_runs() if r.status in ACTIVE), None)

    def info(self, run_dir: Path) -> RunInfo:
        return self._info(run_dir, self.events(run_dir))

    def _info(self, run_dir: Path, events: list[Event]) -> RunInfo:
        state = run_status.run_state(events, self.process(run_dir, events))
        final = run_dir / state.final_path if state.final_path else None
        return RunInfo(run_dir, state.name or _config_name(run_dir), state.status, state.step, state.total_steps,
                       _created(run_dir, events), state.message, final if final and final.is_file() else None,
                       state.final_check, state.final_loss, state.train_seconds, state.history,
                       _read_preset(run_dir))

    def progress(self, run_dir: Path) -> Progress:
        events = self.events(run_dir)
        seen = run_status.progress(events)

        def existing(rel: str | None) -> Path | None:
            return run_dir / rel if rel and (run_dir / rel).is_file() else None

        return Progress(**{**vars(seen), "samples": [(path, label) for rel, label in seen.samples
                                                      if (path := existing(rel))],
                           "sample_sets": {step: [(existing(rel), prompt) for rel, prompt in row]
                                           for step, row in seen.sample_sets.items()}},
                        info=self._info(run_dir, events), validating=_validating(RunDir(run_dir).config),
                        checkpoints=self.checkpoints(run_dir), ema_file=existing(seen.ema_path),
                        event_count=len(events))

    def checkpoints(self, run_dir: Path) -> list[Path]:
        return RunDir(run_dir).list_checkpoints()

    def log_tail(self, run_dir: Path, lines: int = 40) -> str:
        """The last lines of train.log; progress-bar redraws ('\\r') are collapsed to their final state."""
        log = RunDir(run_dir).train_log
        if not log.is_file():
            return ""
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - LOG_TAIL_BYTES))
            text = _ANSI.sub("", handle.read().decode("utf-8", errors="replace"))
        cleaned = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
        while cleaned and not cleaned[-1]:
            cleaned.pop()
        return "\n".join(cleaned[-lines:])

    def config_text(self, run_dir: Path) -> str:
        path = RunDir(run_dir).config
        return path.read_text(encoding="utf-8") if path.is_file() else ""

    # -- the trainer process ------------------------------------------------------------------
    def process(self, run_dir: Path, events: list[Event]) -> Process:
        """What the process table, the pid file and train.log say about the run's trainer."""
        if self.live_pid(run_dir):
            launched = self.launched.get(run_dir)
            return Process(alive=True, started=run_status.process_started(
                events, launched.started_before if launched else None, _mtime(RunDir(run_dir).pid_path)))
        return Process(failure=self._exit_failure(run_dir) if run_status.exit_failure_matters(events) else "")

    def live_pid(self, run_dir: Path) -> int | None:
        """The trainer's PID if it is alive: our own child first (its pid file may not exist yet)."""
        launched = self.launched.get(run_dir)
        if launched is not None and launched.process.poll() is None:
            return launched.process.pid
        # Reaped now (poll), so a stale trainer.pid cannot point at a zombie of ours.
        pid = read_pid(RunDir(run_dir).pid_path)
        return pid if pid and _trainer_alive(pid) else None

    def _exit_failure(self, run_dir: Path) -> str:
        """The trainer's one-sentence complaint when it exited with an error before writing an event.

        The CLI prints it as the last line of train.log ("error: ..."); any other last line of a
        process that exited non-zero (a crash) is shown as it is.
        """
        tail = [line.strip() for line in self.log_tail(run_dir, lines=5).splitlines() if line.strip()]
        last = tail[-1] if tail else ""
        if last.startswith("error: "):
            return last[len("error: "):]
        if last == "interrupted":  # the CLI's word for a Ctrl+C before training (and its stop handler) began
            return "The trainer was stopped while loading, before its first step; start the run again."
        launched = self.launched.get(run_dir)
        crashed = launched is not None and launched.process.poll() not in (0, None)
        return last if crashed and not last.startswith("--- ") else ""


def started_count(events: list[Event]) -> int:
    return sum(1 for e in events if isinstance(e, StartedEvent))


def _is_run(path: Path) -> bool:
    run = RunDir(path)
    return path.is_dir() and not path.name.startswith(".") and (run.config.is_file() or run.events_path.is_file())


def _config_name(run_dir: Path) -> str:
    try:
        with open(RunDir(run_dir).config, "rb") as handle:
            return str(tomllib.load(handle).get("name") or run_dir.name)
    except (OSError, tomllib.TOMLDecodeError):
        return run_dir.name


def _validating(config: Path) -> bool:
    """Whether the run's config measures validation loss (validation.every_steps with a source)."""
    try:
        stamp = config.stat().st_mtime_ns
    except OSError:
        return False
    return _validating_cached(str(config), stamp)


@functools.lru_cache(maxsize=256)
def _validating_cached(config: str, _stamp: int) -> bool:
    try:
        with open(config, "rb") as handle:
            section = tomllib.load(handle).get("validation") or {}
        return bool(section.get("every_steps")) and bool(section.get("images") or section.get("folder"))
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return False


def _created(run_dir: Path, events: list[Event]) -> datetime:
    moment = run_status.event_moment(events[0]) if events else None
    if moment is not None:
        return moment
    config = RunDir(run_dir).config
    stamp = (config if config.exists() else run_dir).stat().st_mtime
    return datetime.fromtimestamp(stamp, tz=timezone.utc)


def _read_preset(run_dir: Path) -> str | None:
    try:
        return RunDir(run_dir).preset.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _trainer_alive(pid: int) -> bool:
    """True when `pid` is a live (non-zombie) process that looks like a trainer.

    A trainer killed with -9 leaves its pid file behind and the number may be reused by an unrelated
    process, which must never receive our SIGINT; on Linux /proc tells them apart.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True  # no /proc (macOS): trust the signal check
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state != "Z" and b"train" in cmdline
