"""One trainer per run folder: an OS lock on RUN_DIR/trainer.lock, held for the trainer process's life.

The operating system releases the lock when its process dies, however it dies (kill -9 included), so a
stale lock file never blocks the next run, unlike a pid file. Within one process the lock is taken once
and kept (a test or a script may train into the same folder twice in a row); it is never given back
early, so nothing can start in the folder between a failure and its `error` event.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

ATTEMPTS, PROBE_WAIT_S = 5, 0.05
_HELD: dict[Path, int] = {}  # lock file -> the open descriptor that holds it, for this process's life


def acquire(path: Path) -> int | None:
    """Take the lock at `path` for this process; None when another live process holds it. On success the
    file holds this process's PID, for the sentence a refused run prints."""
    path = path.resolve()
    if path in _HELD:
        return os.getpid()
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    # A few tries: `held_elsewhere` probes by taking the lock for an instant, which must not refuse a trainer.
    for _ in range(ATTEMPTS):
        if _try_lock(descriptor):
            break
        time.sleep(PROBE_WAIT_S)
    else:
        os.close(descriptor)
        return None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, str(os.getpid()).encode())
    _HELD[path] = descriptor
    return os.getpid()


def holds(path: Path) -> bool:
    """Whether this process holds the lock at `path`."""
    return path.resolve() in _HELD


def held_elsewhere(path: Path) -> bool:
    """Whether another live process holds the lock at `path` (a probe: taken and given back at once)."""
    if holds(path) or not path.is_file():
        return False
    try:
        descriptor = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        if not _try_lock(descriptor):
            return True
        _unlock(descriptor)
        return False
    finally:
        os.close(descriptor)


def read_pid(path: Path) -> int | None:
    """The PID a pid or lock file names (for a lock file: the process that took it last); None if unreadable."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _try_lock(descriptor: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _unlock(descriptor: int) -> None:
    if fcntl is not None:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
    else:
        os.lseek(descriptor, 0, os.SEEK_SET)
        msvcrt.locking(descriptor, msvcrt.LK_UNLCK, 1)
