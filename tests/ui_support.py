"""Shared by the UI tests: serve the UI on a free loopback port, wait for conditions, clean up trainers."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float = 180.0, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached in {timeout:.0f} s (last value: {last!r})")


@contextlib.contextmanager
def served_ui(root: Path, trainer_command: list[str] | None = None, auth: str | None = None):
    """The UI on 127.0.0.1:<free port> in a background thread, runs under root/runs, user presets under root."""
    from app.ui import launch

    previous = os.environ.get("SDLORA_HOME")
    os.environ["SDLORA_HOME"] = str(root / "home")  # "Save as preset" must not touch the real ~/.config
    demo = launch(host="127.0.0.1", port=free_port(), runs_dir=root / "runs", block=False,
                  trainer_command=trainer_command, auth=auth)
    try:
        yield demo
    finally:
        stop_all_trainers(demo.sdlora.runs)
        demo.close()
        if previous is None:
            os.environ.pop("SDLORA_HOME", None)
        else:
            os.environ["SDLORA_HOME"] = previous


def stop_all_trainers(runs) -> None:
    """A failed test must not leave a trainer running: SIGINT, then SIGKILL after a grace period."""
    for info in runs.list_runs():
        pid = runs.live_pid(info.path)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        try:
            runs.wait(info.path, timeout=60)
        except Exception:  # noqa: BLE001 - last resort
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
