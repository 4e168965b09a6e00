"""One-sentence messages in the page, and the guard that turns any handler failure into one.

A user's mistake (a bad path, r = 0) raises SdloraError somewhere below the UI; the guard shows its
sentence once, in the tab's notice box (no toast: it would repeat the sentence and cover the page),
empties the outputs the failed action supersedes (an earlier report), leaves every other output as it
was, and never lets a traceback reach the page. A bug (any other exception) is logged in full to the terminal and shown as
one sentence too.
"""
from __future__ import annotations

import functools
import html
import logging

import gradio as gr

from networks.errors import SdloraError

log = logging.getLogger("sdlora.ui")


def notice(message: str = "", kind: str = "error") -> str:
    """HTML for a notice box; empty text hides it."""
    if not message:
        return ""
    return f'<div class="sd-notice sd-{kind}" role="status">{html.escape(message)}</div>'


def ok(message: str) -> str:
    return notice(message, "ok")


def error_sentence(error: BaseException) -> str:
    if isinstance(error, SdloraError):
        return str(error)
    # A bug, not a user error: full details go to the terminal, one sentence to the page.
    log.exception("unexpected error in the UI")
    return f"Something went wrong ({type(error).__name__}: {error}); the terminal running sdlora has the details."


def guarded(outputs: int, notice_slot: int = 0, clears: tuple[int, ...] = ()):
    """Decorator for handlers returning `outputs` values with the notice box at `notice_slot`; on an error
    the HTML outputs at `clears` are emptied, since what they showed no longer answers the latest action."""

    def wrap(fn):
        @functools.wraps(fn)
        def handler(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - the page must never show a traceback
                sentence = error_sentence(error)
                values = [gr.skip()] * outputs
                for slot in clears:
                    values[slot] = ""
                values[notice_slot] = notice(sentence)
                return values[0] if outputs == 1 else tuple(values)

        return handler

    return wrap


def api_errors(fn):
    """For API endpoints: a user error becomes gradio's Error with the sentence as its message."""

    @functools.wraps(fn)
    def endpoint(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:  # noqa: BLE001
            raise gr.Error(error_sentence(error), print_exception=False) from None

    return endpoint
