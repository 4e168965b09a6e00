"""How a run looks while it trains: the progress bar, the loss curve, the samples, the header.

Pure functions of what app.runs reads from the run folder, so the Train tab, the Runs tab and the
tests all render a run the same way.
"""
from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from app.runs import Progress, RunInfo

SMOOTHING = 0.9  # exponential moving average of the loss; single steps are noisy at batch 1-4
SAMPLES_SHOWN = 12
STATUS_LABELS = {"created": "created", "starting": "starting", "running": "training", "stopped": "stopped",
                 "finished": "finished", "error": "failed", "interrupted": "interrupted"}


def duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_html(progress: Progress | None) -> str:
    if progress is None:
        return ('<div class="sd-progress sd-idle" data-status="none" data-step="0" data-total="0">'
                '<div class="sd-progress-top"><span>No run yet: choose a dataset and a preset, then press '
                'Train.</span></div><div class="sd-bar"><div class="sd-fill" style="width:0%"></div></div></div>')
    info = progress.info
    total = info.total_steps or 0
    percent = 100.0 * info.fraction
    details = [f"step <b>{info.step}</b> / {total or '?'}"]
    if info.status == "running" and progress.it_per_s:
        details.append(f"{progress.it_per_s:.2f} it/s")
        details.append(f"ETA {duration(progress.eta_s)}")
    if progress.losses:
        details.append(f"loss {progress.losses[-1][1]:.4f}")
    if progress.epoch:
        details.append(f"epoch {progress.epoch}")
    label = STATUS_LABELS.get(info.status, info.status)
    return (f'<div class="sd-progress sd-{info.status}" data-status="{info.status}" data-step="{info.step}" '
            f'data-total="{total}">'
            f'<div class="sd-progress-top"><span class="sd-badge sd-badge-{info.status}">{label}</span>'
            f'<span class="sd-details">{" · ".join(details)}</span>'
            f'<span class="sd-percent">{percent:.0f}%</span></div>'
            f'<div class="sd-bar"><div class="sd-fill" style="width:{percent:.1f}%"></div></div></div>')


def header_markdown(info: RunInfo | None) -> str:
    if info is None:
        return "### Live view\nNothing is training."
    when = info.created.astimezone().strftime("%Y-%m-%d %H:%M")
    text = f"### {html.escape(info.name)}\n`{info.folder}` · started {when}"
    if info.final_file is not None:
        text += f" · saved `{info.final_file.name}`"
    return text


def loss_frame(losses: list[tuple[int, float]], validation: list[tuple[int, float]] = ()) -> pd.DataFrame | None:
    """Training loss, its moving average and the validation loss, long format (a `series` column).

    No data is None, not an empty frame: a LinePlot created from an empty frame never draws the
    lines it is given later (gradio 6 fixes the colour domain at the first value).
    """
    if not losses:
        return None
    smooth, average = [], None
    for _, value in losses:
        average = value if average is None else SMOOTHING * average + (1 - SMOOTHING) * value
        smooth.append(average)
    rows = [(s, v, "loss") for s, v in losses] + [(s, v, "smoothed") for (s, _), v in zip(losses, smooth)]
    rows += [(s, v, "validation") for s, v in validation]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def sample_entries(progress: Progress | None) -> list[tuple[str, str]]:
    """Newest samples first, each captioned with its step and prompt."""
    if progress is None:
        return []
    return [(str(path), caption) for path, caption in reversed(progress.samples[-SAMPLES_SHOWN:])]


def log_html(text: str) -> str:
    """The log tail in a box that stays scrolled to its newest line (column-reverse anchors the bottom)."""
    if not text:
        return '<div class="sd-log sd-muted">The trainer\'s output appears here.</div>'
    return f'<div class="sd-log"><pre>{html.escape(text)}</pre></div>'


def files_html(paths: list[Path], empty: str = "None yet.") -> str:
    """Download links for files in the runs folder (served from there: it is in allowed_paths)."""
    if not paths:
        return f'<p class="sd-muted">{html.escape(empty)}</p>'
    rows = "".join(
        f'<tr><td><a href="gradio_api/file={quote(str(p))}" download="{html.escape(p.name)}">'
        f'{html.escape(p.name)}</a></td><td class="sd-size">{_size(p)}</td></tr>' for p in paths)
    return f'<table class="sd-files">{rows}</table>'


def _size(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return ""
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} KB"


def run_row(info: RunInfo) -> list:
    total = info.total_steps or "?"
    return [info.folder, info.name, STATUS_LABELS.get(info.status, info.status), f"{info.step} / {total}",
            info.created.astimezone().strftime("%Y-%m-%d %H:%M")]


def run_dict(progress: Progress) -> dict:
    """A run's state for the API: plain JSON, absolute paths."""
    info = progress.info
    return {"run": info.folder, "run_dir": str(info.path), "name": info.name, "status": info.status,
            "step": info.step, "total_steps": info.total_steps, "message": info.message,
            "loss": progress.losses[-1][1] if progress.losses else None, "it_per_s": progress.it_per_s,
            "validation_loss": progress.validation[-1][1] if progress.validation else None,
            "ema_file": str(progress.ema_file) if progress.ema_file else None,
            "eta_s": progress.eta_s, "final_file": str(info.final_file) if info.final_file else None,
            "checkpoints": [str(p) for p in progress.checkpoints],
            "samples": [str(p) for p, _ in progress.samples],
            "created": info.created.isoformat(timespec="seconds")}
