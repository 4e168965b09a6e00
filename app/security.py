"""What the web UI may read, serve and touch.

The UI runs on the user's machine but is reachable over HTTP, so every path a person types is checked
here before it is used, and files are only handed to the browser from the runs folder (the dataset's
images are shown as generated thumbnails, never served from their folder). Errors are one sentence.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path

from networks.errors import SdloraError

LOOPBACK_NAMES = ("localhost",)


def _clean(text: str | Path | None, what: str) -> Path:
    raw = str(text or "").strip().strip('"').strip("'")
    if not raw:
        raise SdloraError(f"Enter the {what}.")
    if "\x00" in raw:
        raise SdloraError(f"The {what} contains a NUL character; type a normal path.")
    return Path(raw).expanduser().resolve()


def user_folder(text: str | Path | None, what: str = "folder") -> Path:
    """An existing folder from a typed path, made absolute."""
    path = _clean(text, what)
    if not path.exists():
        raise SdloraError(f"The {what} {path} does not exist; check the path.")
    if not path.is_dir():
        raise SdloraError(f"The {what} {path} is a file, not a folder; give the folder that holds it.")
    return path


def user_file(text: str | Path | None, what: str = "file", suffixes: Iterable[str] = ()) -> Path:
    """An existing file from a typed path, made absolute; `suffixes` limits its extension."""
    path = _clean(text, what)
    suffixes = tuple(s.lower() for s in suffixes)
    if not path.exists():
        raise SdloraError(f"The {what} {path} does not exist; check the path.")
    if path.is_dir():
        raise SdloraError(f"The {what} {path} is a folder; choose a file inside it.")
    if suffixes and path.suffix.lower() not in suffixes:
        raise SdloraError(f"The {what} {path.name} is not a {' or '.join(suffixes)} file; choose one that is.")
    return path


def new_folder(text: str | Path | None, what: str = "folder") -> Path:
    """A folder that may be created: absent, or present and empty, with an existing parent folder."""
    path = _clean(text, what)
    if path.is_file():
        raise SdloraError(f"The {what} {path} is a file; choose a new folder name.")
    if path.is_dir() and any(path.iterdir()):
        raise SdloraError(f"The {what} {path} is not empty; choose a new or empty folder.")
    if not path.exists() and not path.parent.is_dir():
        raise SdloraError(f"The parent folder {path.parent} does not exist; create it first or choose another place.")
    return path


def is_inside(path: str | Path, root: str | Path) -> bool:
    """True when `path` is `root` or below it, after resolving symlinks and '..'."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def servable(path: str | Path, roots: Iterable[str | Path]) -> Path:
    """`path` resolved, if it lies inside one of `roots`; the check before a file is sent to the browser."""
    resolved = Path(path).resolve()
    if not any(is_inside(resolved, root) for root in roots):
        raise SdloraError(f"{resolved.name} is outside the runs folder, so the UI does not serve it.")
    return resolved


def run_folder(runs_dir: str | Path, text: str | Path | None) -> Path:
    """A run folder named by the browser: it must be a direct child of the runs folder."""
    raw = str(text or "").strip()
    if not raw:
        raise SdloraError("Choose a run first.")
    runs_dir = Path(runs_dir).resolve()
    path = Path(raw) if Path(raw).is_absolute() else runs_dir / raw
    path = path.resolve()
    if path.parent != runs_dir:
        raise SdloraError(f"{raw} is not a run in {runs_dir}; choose one from the Runs tab.")
    if not path.is_dir():
        raise SdloraError(f"The run {path.name} no longer exists; refresh the list of runs.")
    return path


def parse_auth(auth: str | tuple[str, str] | None) -> tuple[str, str] | None:
    """("user", "pass") from "user:pass" (the password may contain ':'), or None for no login."""
    if auth is None or auth == "":
        return None
    if isinstance(auth, (tuple, list)):
        user, password = auth
    else:
        user, _, password = str(auth).partition(":")
    if not user or not password:
        raise SdloraError("--auth must look like USER:PASS, with both parts non-empty.")
    return str(user), str(password)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
