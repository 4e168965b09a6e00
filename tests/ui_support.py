"""Shared by the UI tests: serve the UI on a free loopback port, wait for conditions, clean up trainers."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest


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


# -- the page in Chromium (Debian's, through Playwright): helpers the browser tests share -------------
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def playwright_or_skip():
    """Playwright's sync API, or a skip of the calling test module where Chromium or Playwright is missing."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's Chromium (/usr/bin/chromium) is not installed; apt-get install chromium",
                    allow_module_level=True)
    return pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def open_page(browser, url: str):
    """A fresh browser context on the UI, its first tab loaded; close it with page.context.close()."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#dataset-open")
    return page


def shot(page, name: str, folder: Path = ARTIFACTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)
    return folder / name


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first


def set_field(page, elem_id: str, value: str) -> None:
    """Fill a field in a just-opened section and make sure the value holds: Gradio mounts a section's
    inputs when it first opens, and on a loaded machine the mount can land after the typing and reset it."""
    for _ in range(20):
        field(page, elem_id).fill(value)
        page.wait_for_timeout(250)
        if field(page, elem_id).input_value() == value:
            return
    raise AssertionError(f"#{elem_id} did not keep {value!r}")


def train_notice(page) -> str:
    return page.locator("#train-notice").inner_text()


def choose_preset(page, name: str) -> None:
    page.locator("#preset input").click()
    label = re.compile(rf"(?<![\w-]){re.escape(name)} ·")  # "style-lora ·" must not pick "sdxl-style-lora ·"
    page.locator("ul[role=listbox] li", has_text=label).first.click()


def open_section(page, section: str) -> None:
    if not page.locator(f"#advanced-{section}").is_visible():
        page.get_by_text("Advanced: every setting").click()
    page.locator(f"#advanced-{section} > button").click()
