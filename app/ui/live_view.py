"""How a run looks while it trains: the progress bar, the loss curve, the samples, the header.

Pure functions of what app.run_list reads from the run folder, so the Train tab, the Runs tab and the
tests all render a run the same way.
"""
from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from app.run_list import Progress, RunInfo
from trainer.run.events import LoadCheckEvent
from trainer.run.gpu_memory import gb

SMOOTHING = 0.9  # exponential moving average of the loss; single steps are noisy at batch 1-4
SAMPLE_STEPS_SHOWN = 10  # columns of the sample grid: the newest steps
PROBLEMS_SHOWN = 3
TARGETS = "A1111 / ComfyUI / diffusers"
LYCORIS_TARGETS = "A1111 / ComfyUI / LyCORIS (not diffusers)"  # LoHa/LoKr: the load check's not_loaded_by
STATUS_LABELS = {"created": "created", "starting": "starting", "running": "training", "stopped": "stopped",
                 "finished": "finished", "error": "failed", "interrupted": "interrupted"}


def duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_html(progress: Progress | None, other_runs: int = 0) -> str:
    """The bar of a run; with none shown, what to do (and that `other_runs` exist, when some do)."""
    if progress is None:
        what = (f"No run shown here: {other_runs} run{'s are' if other_runs != 1 else ' is'} in the Runs tab "
                "(Watch shows one here), or start a new one with Train." if other_runs else
                "No run yet: choose a dataset and a preset, then press Train.")
        return ('<div class="sd-progress sd-idle" data-status="none" data-step="0" data-total="0">'
                f'<div class="sd-progress-top"><span>{what}</span></div>'
                '<div class="sd-bar"><div class="sd-fill" style="width:0%"></div></div></div>')
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
            f'<div class="sd-bar"><div class="sd-fill" style="width:{percent:.1f}%"></div></div>'
            f'{memory_html(progress)}{load_check_html(shown_check(progress))}</div>')


def memory_line(progress: Progress) -> str:
    """'GPU memory: 7.1 GB used of 8.0 GB (predicted 7.4 GB)' on CUDA once a step measured it; '' elsewhere."""
    if progress.gpu_reserved is None:
        return ""
    line = f"GPU memory: {gb(progress.gpu_reserved)} used"
    if progress.gpu_card:
        line += f" of {gb(progress.gpu_card)}"
    return line + (f" (predicted {gb(progress.gpu_predicted)})" if progress.gpu_predicted else "")


def memory_html(progress: Progress) -> str:
    """The memory line and the run's memory warnings (each a sentence saying what to change)."""
    line = memory_line(progress)
    parts = [f'<div class="sd-memory" data-reserved="{progress.gpu_reserved}">{html.escape(line)}</div>'] if line else []
    parts += [f'<div class="sd-memory-warning">⚠ {html.escape(w)}</div>' for w in progress.warnings]
    return "".join(parts)


def shown_check(progress: Progress) -> LoadCheckEvent | None:
    """The load check the live view shows: the final file's, else the newest written file's."""
    if progress.info.final_check is not None:
        return progress.info.final_check
    if progress.info.final_file is not None:
        return None  # a run from before load checks: nothing to say
    return progress.last_check


def targets_of(check: LoadCheckEvent) -> str:
    """Where the checked file loads: LoHa/LoKr files are read by A1111, ComfyUI and LyCORIS, not diffusers."""
    return LYCORIS_TARGETS if check.not_loaded_by else TARGETS


def load_check_html(check: LoadCheckEvent | None) -> str:
    """A green or red line saying whether a written LoRA file loads the way generators read it."""
    if check is None:
        return ""
    name = html.escape(Path(check.path).name)
    targets = targets_of(check)
    if check.ok:
        count = f" · {check.modules} modules" if check.modules is not None else ""
        return (f'<div class="sd-loadcheck sd-loadcheck-ok" data-ok="true" title="{name}">'
                f'<span class="sd-loadcheck-mark">✓</span><b>{name}</b> loads in {targets}{count}</div>')
    problems = [str(p) for p in check.problems] or ["unknown problem"]
    listed = "; ".join(html.escape(p) for p in problems[:PROBLEMS_SHOWN])
    more = f" (+{len(problems) - PROBLEMS_SHOWN} more)" if len(problems) > PROBLEMS_SHOWN else ""
    return (f'<div class="sd-loadcheck sd-loadcheck-bad" data-ok="false" title="{name}">'
            f'<span class="sd-loadcheck-mark">✗</span><b>{name}</b> does not load in {targets}: '
            f'{listed}{more}</div>')


def header_markdown(info: RunInfo | None) -> str:
    if info is None:
        return "### Live view\nNothing is training."
    when = info.created.astimezone().strftime("%Y-%m-%d %H:%M")
    text = f"### {html.escape(info.name)}\n`{info.folder}` · started {when}"
    if info.final_file is not None:
        text += f" · saved `{info.final_file.name}`"
    if info.resumed:
        text += f"\n\n{history_text(info)}"
    return text


HISTORY_WORDS = {"stopped": "stopped at step {}", "finished": "finished at step {}", "error": "failed at step {}"}


def history_text(info: RunInfo) -> str:
    """'started → stopped at step 5 → resumed from step 5 → finished at step 12'."""
    words = []
    for kind, step in info.history:
        if kind == "started":
            words.append(f"resumed from step {step}" if words else "started")
        else:
            words.append(HISTORY_WORDS.get(kind, kind + " at step {}").format(step))
    return " → ".join(words)


def loss_frame(losses: list[tuple[int, float]], validation: list[tuple[int, float]] = (),
               validating: bool = False) -> pd.DataFrame | None:
    """Training loss, its moving average and the validation loss, long format (a `series` column).

    No data is None, not an empty frame: a LinePlot created from an empty frame never draws the
    lines it is given later (gradio 6 fixes the colour domain at the first value). For the same reason
    a run that measures validation loss gets an empty (NaN) validation point before its first
    measurement, so the curve is drawn in its colour, with its legend entry, once it comes.
    """
    if not losses:
        return None
    smooth, average = [], None
    for _, value in losses:
        average = value if average is None else SMOOTHING * average + (1 - SMOOTHING) * value
        smooth.append(average)
    rows = [(s, v, "loss") for s, v in losses] + [(s, v, "smoothed") for (s, _), v in zip(losses, smooth)]
    rows += [(s, v, "validation") for s, v in validation]
    if validating and not validation:
        rows.append((losses[0][0], float("nan"), "validation"))
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def sample_grid_html(progress: Progress | None) -> str:
    """Samples as a grid: one row per prompt, one column per step, each image a link to the full-size file
    (served from the run folder, which is in allowed_paths). The newest SAMPLE_STEPS_SHOWN steps show; the
    earlier ones are one click away, a page of SAMPLE_STEPS_SHOWN steps each, newest page first."""
    if progress is None or not progress.sample_sets:
        return '<div class="sd-grid-empty sd-muted">Samples appear here as the run draws them.</div>'
    every = list(progress.sample_sets)
    pages = [every[max(0, end - SAMPLE_STEPS_SHOWN):end] for end in range(len(every), 0, -SAMPLE_STEPS_SHOWN)]
    steps = pages[0]
    rows = max(len(progress.sample_sets[s]) for s in every)
    prompts = [""] * rows
    for step in every:  # the newest wording of each prompt
        for index, (_, prompt) in enumerate(progress.sample_sets[step]):
            prompts[index] = prompt or prompts[index]
    note = "Rows: prompts · columns: steps · click an image to open it full size."
    if len(pages) > 1:
        note = (f"Showing the newest {len(steps)} of {len(every)} sampled steps (steps {steps[0]} to "
                f"{steps[-1]}); earlier steps are below. " + note)
    earlier = "".join(f'<details class="sd-grid-page"><summary>Steps {page[0]} to {page[-1]}</summary>'
                      f'{_grid_table(progress, page, prompts)}</details>' for page in pages[1:])
    return (f'<div class="sd-grid" data-steps="{len(steps)}" data-prompts="{rows}" data-all-steps="{len(every)}">'
            f'{_grid_table(progress, steps, prompts)}<div class="sd-muted">{note}</div>{earlier}</div>')


def _grid_table(progress: Progress, steps: list[int], prompts: list[str]) -> str:
    head = '<th class="sd-grid-prompt">prompt</th>' + "".join(f"<th>step {s}</th>" for s in steps)
    body = []
    for index in range(len(prompts)):
        cells = []
        for step in steps:
            row = progress.sample_sets[step]
            path = row[index][0] if index < len(row) else None
            if path is None:
                cells.append('<td class="sd-grid-missing">-</td>')
                continue
            url = f"gradio_api/file={quote(str(path))}"
            title = html.escape(f"step {step}: {prompts[index]}", quote=True)
            cells.append(f'<td><a href="{url}" target="_blank" rel="noopener" title="{title} (open full size)">'
                         f'<img src="{url}" alt="{title}" loading="lazy"></a></td>')
        prompt = html.escape(prompts[index] or f"prompt {index + 1}")
        body.append(f'<tr><th class="sd-grid-prompt" title="{prompt}">{prompt}</th>{"".join(cells)}</tr>')
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def log_html(text: str) -> str:
    """The log tail in a box that stays scrolled to its newest line (column-reverse anchors the bottom)."""
    if not text:
        return '<div class="sd-log sd-muted">The trainer\'s output appears here.</div>'
    return f'<div class="sd-log"><pre>{html.escape(text)}</pre></div>'


def files_html(paths: list[Path], empty: str = "None yet.", checks: dict[str, LoadCheckEvent] | None = None,
               run_dir: Path | None = None) -> str:
    """Download links for files in the runs folder (served from there: it is in allowed_paths), each with
    its load check when `checks` (relative path -> `load_check` event) has one."""
    if not paths:
        return f'<p class="sd-muted">{html.escape(empty)}</p>'
    rows = []
    for p in paths:
        check = _check_of(p, checks, run_dir)
        link = (f'<a href="gradio_api/file={quote(str(p))}" download="{html.escape(p.name)}">'
                f'{html.escape(p.name)}</a>')
        if check is None:
            verdict = ""
        elif check.ok:
            verdict = '<span class="sd-chip sd-chip-ok" title="loads in ' + targets_of(check) + '">✓ loads</span>'
        else:
            problems = "; ".join(str(x) for x in check.problems[:PROBLEMS_SHOWN])
            verdict = (f'<span class="sd-chip sd-chip-bad" title="{html.escape(problems, quote=True)}">'
                       '✗ fails the load check</span>')
            link = f'<span class="sd-file-bad">{html.escape(p.name)}</span>'  # not offered as a usable file
        rows.append(f'<tr><td>{link} {verdict}</td><td class="sd-size">{_size(p)}</td></tr>')
    return f'<table class="sd-files">{"".join(rows)}</table>'


def _check_of(path: Path, checks: dict[str, LoadCheckEvent] | None, run_dir: Path | None) -> LoadCheckEvent | None:
    if not checks or run_dir is None:
        return None
    try:
        return checks.get(path.relative_to(run_dir).as_posix())
    except ValueError:
        return None


def _check_dict(run_dir: Path, check: LoadCheckEvent | None) -> dict | None:
    """A load check for the API: the file as an absolute `file` (a `path` key would make gradio_client
    take the dict for a file to download)."""
    if check is None:
        return None
    return {"file": str(run_dir / check.path), "ok": check.ok, "problems": list(check.problems),
            "modules": check.modules}


def _size(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return ""
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} KB"


RUN_COLUMNS = ["Run folder", "Name", "Status", "Steps", "Final loss", "Time", "File", "Preset", "Started"]


def run_row(info: RunInfo) -> list:
    """The run's row in the Runs table, in RUN_COLUMNS order."""
    total = info.total_steps or "?"
    status = STATUS_LABELS.get(info.status, info.status)
    if info.resumed:
        status += f" · resumed {info.resumed}x"
    loss = f"{info.final_loss:.4f}" if info.final_loss is not None else "-"
    size = _size(info.final_file) if info.final_file else "-"
    return [info.folder, info.name, status, f"{info.step} / {total}", loss, duration(info.train_seconds), size,
            info.preset or "-", info.created.astimezone().strftime("%Y-%m-%d %H:%M")]


def run_dict(progress: Progress) -> dict:
    """A run's state for the API: plain JSON, absolute paths."""
    info = progress.info
    return {"run": info.folder, "run_dir": str(info.path), "name": info.name, "status": info.status,
            "step": info.step, "total_steps": info.total_steps, "message": info.message,
            "loss": progress.losses[-1][1] if progress.losses else None, "it_per_s": progress.it_per_s,
            "validation_loss": progress.validation[-1][1] if progress.validation else None,
            "ema_file": str(progress.ema_file) if progress.ema_file else None,
            "load_check": _check_dict(info.path, shown_check(progress)),
            "eta_s": progress.eta_s, "final_file": str(info.final_file) if info.final_file else None,
            "checkpoints": [str(p) for p in progress.checkpoints],
            "samples": [str(p) for p, _ in progress.samples],
            "created": info.created.isoformat(timespec="seconds")}
