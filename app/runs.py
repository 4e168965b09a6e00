"""The run manager: the UI's side of the run-directory contract (docs/RUN_DIRECTORY.md).

It writes a run's config.toml, starts `sdlora train` as a separate process (never training inside the
UI process, so a browser refresh or a UI restart loses nothing), and otherwise only reads: the state of
a run is worked out from events.jsonl and trainer.pid, exactly as the CLI would see it. Stopping is a
SIGINT, which the trainer turns into "save a checkpoint, then exit".
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from app.security import run_folder, user_folder
from networks.atomic import write_text_atomic
from networks.errors import SdloraError
from trainer.config import TrainConfig, save_config
from trainer.data.images import IMAGE_EXTENSIONS
from trainer.preflight import Report, preflight_report
from trainer.run.run_dir import RunDir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

LIFECYCLE = ("started", "stopped", "finished", "error")
# Statuses in which a trainer process is (or is about to be) alive.
ACTIVE = ("starting", "running")
RESUMABLE = ("stopped", "interrupted", "error")
LOG_TAIL_BYTES = 64 * 1024
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colours and cursor moves from progress bars


@dataclass(frozen=True)
class RunInfo:
    """One run as the UI lists it."""

    path: Path
    name: str
    status: str  # created | starting | running | stopped | finished | error | interrupted
    step: int
    total_steps: int | None
    created: datetime
    message: str = ""  # the error sentence, when there is one
    final_file: Path | None = None  # only a file that passed its load check (or predates load checks)
    final_check: dict | None = None  # the `load_check` event of the final file, when there is one
    final_loss: float | None = None  # the last logged training loss
    train_seconds: float | None = None  # time spent training, summed over its segments (a resume adds one)
    history: tuple[tuple[str, int], ...] = ()  # (lifecycle event, step) in order: started, stopped, started...
    preset: str | None = None  # the preset the UI started it from, when it did

    @property
    def resumed(self) -> int:
        """How many times the run continued from a checkpoint."""
        return max(0, sum(1 for kind, _ in self.history if kind == "started") - 1)

    @property
    def folder(self) -> str:
        return self.path.name

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


@dataclass
class Progress:
    """What the live view shows for one run, all read from its folder."""

    info: RunInfo
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    it_per_s: float | None = None
    eta_s: float | None = None
    epoch: int | None = None
    lr: float | None = None
    samples: list[tuple[Path, str]] = field(default_factory=list)  # (image, "step N: prompt"), oldest first
    # The sample grid: step -> [(image or None, prompt)] by prompt index, steps in order of appearance.
    sample_sets: dict[int, list[tuple[Path | None, str]]] = field(default_factory=dict)
    load_checks: dict[str, dict] = field(default_factory=dict)  # relative path -> its latest `load_check` event
    last_check: dict | None = None  # the newest `load_check` event of the run
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

    def read(self) -> list[dict]:
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
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # never let one damaged line hide a run
            if isinstance(record, dict) and "event" in record:
                self._events.append(record)
        self._offset += end + 1


class RunManager:
    """Creates, starts, stops, resumes, lists and deletes runs in one runs folder."""

    def __init__(self, runs_dir: str | Path, trainer_command: list[str] | None = None):
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        # `sdlora train` of the same Python the UI runs in; tests substitute a fake trainer.
        self.trainer_command = list(trainer_command or [sys.executable, "-m", "app.cli", "train"])
        self._children: dict[Path, subprocess.Popen] = {}
        self._started_at_launch: dict[Path, int] = {}  # `started` events already there when we launched
        self._logs: dict[Path, EventLog] = {}
        self._lock = threading.Lock()
        self._launch_lock = threading.Lock()  # the busy check and the launch must not interleave

    # -- reading --------------------------------------------------------------------------------
    def resolve(self, run: str | Path) -> Path:
        return run_folder(self.runs_dir, run)

    def events(self, run_dir: Path) -> list[dict]:
        with self._lock:
            log = self._logs.setdefault(run_dir, EventLog(RunDir(run_dir).events_path))
        return log.read()

    def list_runs(self) -> list[RunInfo]:
        """Every run in the runs folder, newest first."""
        runs = [self.info(p) for p in self.runs_dir.iterdir() if _is_run(p)]
        return sorted(runs, key=lambda r: (r.created, r.folder), reverse=True)

    def info(self, run_dir: Path) -> RunInfo:
        return self._info(run_dir, self.events(run_dir))

    def _info(self, run_dir: Path, events: list[dict]) -> RunInfo:
        status, message = self._status(run_dir, events)
        last_step = next((e for e in reversed(events) if e["event"] in ("step", "stopped", "finished")), None)
        started = next((e for e in reversed(events) if e["event"] == "started"), None)
        step = int(last_step["step"]) if last_step else int(started.get("start_step", 0)) if started else 0
        total = next((e.get("total_steps") for e in reversed(events) if e.get("total_steps")), None)
        final = next((e.get("path") for e in reversed(events) if e["event"] == "finished"), None)
        final_file = run_dir / final if final and (run_dir / final).is_file() else None
        final_check = next((e for e in reversed(events) if e["event"] == "load_check" and e.get("path") == final),
                           None) if final else None
        if final_check is not None and not final_check.get("ok"):
            # A file that does not load is never presented as a finished LoRA.
            problems = final_check.get("problems") or ["unknown problem"]
            status, final_file = "error", None
            message = f"{Path(final).name} failed the load check ({problems[0]}); it is kept for inspection " \
                      "but is not a usable LoRA."
        loss = next((e.get("loss") for e in reversed(events) if e["event"] == "step"
                     and isinstance(e.get("loss"), (int, float))), None)
        history = tuple((e["event"], int(e.get("start_step", e.get("step")) or 0)) for e in events
                        if e["event"] in LIFECYCLE)
        return RunInfo(run_dir, _run_name(run_dir, started), status, step, total, _created(run_dir, events),
                       message, final_file, final_check, loss, _train_seconds(events), history,
                       _read_preset(run_dir))

    def progress(self, run_dir: Path) -> Progress:
        events = self.events(run_dir)
        progress = Progress(self._info(run_dir, events), event_count=len(events),
                            validating=_validating(RunDir(run_dir).config))
        for event in events:
            kind = event["event"]
            if kind == "step":
                if isinstance(event.get("loss"), (int, float)):
                    progress.losses.append((int(event["step"]), float(event["loss"])))
                progress.it_per_s, progress.eta_s = event.get("it_per_s"), event.get("eta_s")
                progress.epoch, progress.lr = event.get("epoch"), event.get("lr")
            elif kind == "sample":
                prompts = event.get("prompts") or []
                row = []
                for index, rel in enumerate(event.get("paths") or []):
                    prompt = prompts[index] if index < len(prompts) else ""
                    present = isinstance(rel, str) and (run_dir / rel).is_file()
                    row.append((run_dir / rel if present else None, str(prompt)))
                    if present:
                        progress.samples.append((run_dir / rel, f"step {event.get('step')}: {prompt}"))
                if isinstance(event.get("step"), int):
                    progress.sample_sets.pop(event["step"], None)  # a resume replays it: keep the newest
                    progress.sample_sets[event["step"]] = row
            elif kind == "load_check" and isinstance(event.get("path"), str):
                progress.load_checks[event["path"]] = event
                progress.last_check = event
            elif kind == "validation" and isinstance(event.get("loss"), (int, float)):
                progress.validation.append((int(event["step"]), float(event["loss"])))
            elif kind in ("started", "stopped", "finished", "error"):
                progress.it_per_s = progress.eta_s = None  # the rate of a finished segment means nothing now
                if kind == "started":
                    # A resume after a crash replays the steps since the last checkpoint: keep the new ones.
                    resumed_at = int(event.get("start_step") or 0)
                    progress.losses = [point for point in progress.losses if point[0] <= resumed_at]
                    progress.validation = [point for point in progress.validation if point[0] <= resumed_at]
                ema = event.get("ema_path") if kind == "finished" else None
                progress.ema_file = run_dir / ema if ema and (run_dir / ema).is_file() else None
        progress.checkpoints = self.checkpoints(run_dir)
        return progress

    def checkpoints(self, run_dir: Path) -> list[Path]:
        return sorted(RunDir(run_dir).checkpoints.glob("*.safetensors"))

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

    def newest_active(self) -> RunInfo | None:
        return next((r for r in self.list_runs() if r.status in ACTIVE), None)

    # -- status -----------------------------------------------------------------------------------
    def _status(self, run_dir: Path, events: list[dict]) -> tuple[str, str]:
        last = next((e for e in reversed(events) if e["event"] in LIFECYCLE), None)
        if self.live_pid(run_dir):
            # Loading (a resumed run still has its old `stopped` last until its new `started`), or running;
            # after its final event the process is still saving and exiting, which counts as running.
            return ("running" if self._current_process_started(run_dir, events) else "starting"), ""
        if last is None:
            failure = self._exit_failure(run_dir)
            return ("error", failure) if failure else ("created", "")
        kind = last["event"]
        if kind == "started":
            return "interrupted", self._exit_failure(run_dir) or ""
        if kind == "error":
            return "error", str(last.get("message") or "The trainer reported an error.")
        return kind, ""

    def _current_process_started(self, run_dir: Path, events: list[dict]) -> bool:
        """Whether the live trainer has written its own `started` event yet."""
        started = [e for e in events if e["event"] == "started"]
        if run_dir in self._started_at_launch:
            return len(started) > self._started_at_launch[run_dir]
        # Not our child (the UI restarted): the trainer writes trainer.pid before its `started` event.
        try:
            pid_written = int(RunDir(run_dir).pid_path.stat().st_mtime)
        except OSError:
            return bool(started)
        return bool(started) and _event_time(started[-1]) >= pid_written

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
        child = self._children.get(run_dir)
        crashed = child is not None and child.poll() not in (0, None)
        return last if crashed and not last.startswith("--- ") else ""

    def live_pid(self, run_dir: Path) -> int | None:
        """The trainer's PID if it is alive: our own child first (its pid file may not exist yet)."""
        child = self._children.get(run_dir)
        if child is not None:
            if child.poll() is None:
                return child.pid
            # Reaped now, so a stale trainer.pid cannot point at a zombie of ours.
        pid = _read_pid(RunDir(run_dir).pid_path)
        return pid if pid and _trainer_alive(pid) else None

    # -- control ----------------------------------------------------------------------------------
    def new_run_dir(self, name: str) -> Path:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        candidate, counter = self.runs_dir / f"{name}-{stamp}", 1
        while candidate.exists():
            counter += 1
            candidate = self.runs_dir / f"{name}-{stamp}-{counter}"
        candidate.mkdir(parents=True)
        return candidate

    def check(self, cfg: TrainConfig, preset: str | None = None) -> tuple[TrainConfig, Report]:
        """`cfg` with absolute paths and the pre-flight report (docs/PREFLIGHT.md) on it."""
        cfg = preflight(cfg)
        return cfg, preflight_report(cfg, preset)

    def start(self, cfg: TrainConfig, preset: str | None = None, report: Report | None = None) -> Path:
        """Check `cfg` (unless `report` is the check of this very cfg), write a new run folder with it as
        config.toml and start the trainer on it. A check that finds errors stops here, with the first."""
        if report is None:
            cfg, report = self.check(cfg, preset)
        if not report.ok:
            raise SdloraError(report.errors[0])
        with self._launch_lock:
            self._refuse_if_busy()
            run_dir = self.new_run_dir(cfg.name)
            cfg.output.dir = str(run_dir)
            run = RunDir(run_dir)
            save_config(cfg, run.config)
            if preset:  # config.toml holds the resolved settings; the preset's name is only known here
                write_text_atomic(run.preset, preset + "\n")
            self._launch(run_dir, ["--config", str(run.config)])
        return run_dir

    def resume(self, run_dir: Path) -> Path:
        info = self.info(run_dir)
        if info.status in ACTIVE:
            raise SdloraError(f"The run {run_dir.name} is already training.")
        if info.status == "finished":
            raise SdloraError(f"The run {run_dir.name} has finished; start a new run to train more.")
        if not RunDir(run_dir).state.is_dir():
            raise SdloraError(f"The run {run_dir.name} has no saved state yet (no checkpoint was written); "
                              "start it again as a new run.")
        with self._launch_lock:
            self._refuse_if_busy()
            self._launch(run_dir, ["--resume", str(run_dir)])
        return run_dir

    def stop(self, run_dir: Path) -> int:
        """Ask the trainer to save and exit (SIGINT); returns the PID signalled."""
        pid = self.live_pid(run_dir)
        if pid is None:
            raise SdloraError(f"The run {run_dir.name} is not training, so there is nothing to stop.")
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            raise SdloraError(f"The run {run_dir.name} had already stopped.") from None
        except PermissionError:
            raise SdloraError(f"The run {run_dir.name} belongs to another user, so it cannot be stopped "
                              "from here.") from None
        return pid

    def delete(self, run_dir: Path) -> None:
        if self.info(run_dir).status in ACTIVE:
            raise SdloraError(f"The run {run_dir.name} is training; stop it before deleting it.")
        shutil.rmtree(run_dir)
        with self._lock:
            self._logs.pop(run_dir, None)
            self._children.pop(run_dir, None)
            self._started_at_launch.pop(run_dir, None)

    def wait(self, run_dir: Path, timeout: float | None = None) -> int | None:
        """Wait for our own trainer process of `run_dir` to exit (for tests and scripts)."""
        child = self._children.get(run_dir)
        return child.wait(timeout) if child is not None else None

    def _refuse_if_busy(self) -> None:
        # One trainer at a time: two runs on one GPU (or two CPU cores) only make both slow or crash.
        active = self.newest_active()
        if active is not None:
            raise SdloraError(f"The run {active.folder} is still training; stop it or wait for it to finish "
                              "before starting another.")

    def _launch(self, run_dir: Path, args: list[str]) -> subprocess.Popen:
        command = [*self.trainer_command, *args, "--no-progress"]
        started_before = sum(1 for e in self.events(run_dir) if e["event"] == "started")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(RunDir(run_dir).train_log, "ab") as log:
            log.write(f"--- {_now()} train {' '.join(args)}\n".encode())
            log.flush()
            # A new session: Ctrl+C in the UI's terminal must not stop the training, and the trainer
            # outlives a UI restart.
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True, close_fds=True)
        with self._lock:
            self._children[run_dir] = child
            self._started_at_launch[run_dir] = started_before
        return child


def preflight(cfg: TrainConfig) -> TrainConfig:
    """A copy of `cfg` with absolute paths, after the quick checks of what a user types: the dataset
    folder holds images and a model given as a path exists (the full check is trainer.preflight)."""
    cfg = cfg.model_copy(deep=True)
    folder = user_folder(cfg.dataset.path, "dataset folder")
    if not _has_images(folder):
        raise SdloraError(f"The dataset folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                          "add some or choose another folder.")
    cfg.dataset.path = str(folder)
    model = cfg.model.path.strip()
    if not model.startswith("demo:"):
        path = Path(model).expanduser()
        if path.exists():
            cfg.model.path = str(path.resolve())
        elif not (_HUB_ID.fullmatch(model) and not path.suffix):
            raise SdloraError(f"The base model {model} was not found; give a diffusers folder, a "
                              ".safetensors/.ckpt file, or demo:shapes.")
    return cfg


def _has_images(folder: Path) -> bool:
    """Images at the top level or in kohya-style sub-folders (one level down), as the trainer reads them."""
    for entry in folder.iterdir():
        if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            return True
        if entry.is_dir() and not entry.name.startswith("."):
            if any(f.suffix.lower() in IMAGE_EXTENSIONS for f in entry.iterdir() if f.is_file()):
                return True
    return False


def _is_run(path: Path) -> bool:
    run = RunDir(path)
    return path.is_dir() and not path.name.startswith(".") and (run.config.is_file() or run.events_path.is_file())


def _run_name(run_dir: Path, started: dict | None) -> str:
    if started and started.get("name"):
        return str(started["name"])
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


def _created(run_dir: Path, events: list[dict]) -> datetime:
    if events and events[0].get("time"):
        try:
            moment = datetime.fromisoformat(str(events[0]["time"]).replace("Z", "+00:00"))
            return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
        except ValueError:
            pass
    config = RunDir(run_dir).config
    stamp = (config if config.exists() else run_dir).stat().st_mtime
    return datetime.fromtimestamp(stamp, tz=timezone.utc)


def _read_preset(run_dir: Path) -> str | None:
    try:
        return RunDir(run_dir).preset.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _train_seconds(events: list[dict]) -> float | None:
    """Seconds from each `started` to the last event of its segment (the next start, or now's last line)."""
    total, begun, last = 0.0, None, None
    for event in events:
        moment = _event_time(event) or None
        if event["event"] == "started":
            if begun is not None and last is not None:
                total += last - begun
            begun = last = moment
        elif moment is not None and begun is not None:
            last = moment
    if begun is not None and last is not None:
        total += last - begun
    return total if any(e["event"] == "started" for e in events) else None


def _event_time(event: dict) -> float:
    try:
        moment = datetime.fromisoformat(str(event.get("time", "")).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
