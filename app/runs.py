"""The run manager: the UI's side of the run-directory contract (docs/RUN_DIRECTORY.md) that acts.

It writes a run's config.toml, starts `sdlora train` as a separate process (never training inside the
UI process, so a browser refresh or a UI restart loses nothing), stops it with a SIGINT, which the
trainer turns into "save a checkpoint, then exit", resumes and deletes runs. Reading runs is
app/run_list.py's, worked out from events.jsonl and trainer.pid exactly as the CLI would see it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from app.run_list import Launched, RunInfo, RunList, started_count
from app.security import user_folder
from networks.errors import SdloraError
from trainer.config import TrainConfig, save_config
from trainer.data.images import IMAGE_EXTENSIONS
from trainer.model.facts import locate_model
from trainer.preflight import Report, preflight_report
from trainer.run.run_dir import RunDir
from trainer.run.status import ACTIVE


class RunManager(RunList):
    """Creates, starts, stops, resumes and deletes runs in one runs folder (reading them is RunList's)."""

    def __init__(self, runs_dir: str | Path, trainer_command: list[str] | None = None):
        super().__init__(runs_dir)
        # `sdlora train` of the same Python the UI runs in; tests substitute a fake trainer.
        self.trainer_command = list(trainer_command or [sys.executable, "-m", "app.cli", "train"])
        self._launch_lock = threading.Lock()  # the busy check and the launch must not interleave

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
            run.write_preset(preset)
            self._launch(run_dir, ["--config", str(run.config)])
        return run_dir

    def resume(self, run_dir: Path) -> Path:
        info = self.info(run_dir)
        self._refuse_if_training(run_dir, info)
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
        if self.info(run_dir).status in ACTIVE or RunDir(run_dir).busy():
            raise SdloraError(f"The run {run_dir.name} is training; stop it before deleting it.")
        shutil.rmtree(run_dir)
        self.forget(run_dir)

    def wait(self, run_dir: Path, timeout: float | None = None) -> int | None:
        """Wait for our own trainer process of `run_dir` to exit (for tests and scripts)."""
        launched = self.launched.get(run_dir)
        return launched.process.wait(timeout) if launched is not None else None

    def _refuse_if_training(self, run_dir: Path, info: RunInfo) -> None:
        # The folder's lock also catches a trainer that no pid file names yet (one started from a terminal).
        if info.status in ACTIVE or RunDir(run_dir).busy():
            raise SdloraError(f"The run {run_dir.name} is already training.")

    def _refuse_if_busy(self) -> None:
        # One trainer at a time: two runs on one GPU (or two CPU cores) only make both slow or crash.
        active = self.newest_active()
        if active is not None:
            raise SdloraError(f"The run {active.folder} is still training; stop it or wait for it to finish "
                              "before starting another.")

    def _launch(self, run_dir: Path, args: list[str]) -> subprocess.Popen:
        command = [*self.trainer_command, *args, "--no-progress"]
        started_before = started_count(self.events(run_dir))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(RunDir(run_dir).train_log, "ab") as log:
            log.write(f"--- {_now()} train {' '.join(args)}\n".encode())
            log.flush()
            # A new session: Ctrl+C in the UI's terminal must not stop the training, and the trainer
            # outlives a UI restart.
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True, close_fds=True)
        with self._lock:
            self.launched[run_dir] = Launched(child, started_before)
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
    location = locate_model(cfg.model.path)  # the loader's own check, and its sentence
    if location.is_local:
        cfg.model.path = str(Path(location.where).resolve())
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
