"""The pre-flight report (trainer/preflight/, docs/PREFLIGHT.md) as a panel under the Train button."""
from __future__ import annotations

import html

from trainer.preflight import Report

SECTIONS = (("errors", "sd-check-error", "Errors (training cannot start)"),
            ("warnings", "sd-check-warning", "Warnings (advice)"),
            ("info", "sd-check-info", "Plan"))


def buckets_line(buckets: list[dict]) -> str:
    """'Buckets: 512x512: 10 images, 448x576: 2 images' from the report's data."""
    parts = [f"{b.get('width')}x{b.get('height')}: {b.get('images')} image{'s' if b.get('images') != 1 else ''}"
             + (f" ({b.get('samples')} with repeats)" if b.get("samples") not in (None, b.get("images")) else "")
             for b in buckets]
    return f"Buckets ({len(buckets)}): " + ", ".join(parts) + "."


def report_html(report: Report | None, words=lambda text: text) -> str:
    """The report as HTML; `words` rewrites each line for the page (the Train tab names fields by label)."""
    if report is None:
        return ""
    verdict = "Ready to train" if report.ok else "Cannot train yet"
    counts = f"{len(report.errors)} errors, {len(report.warnings)} warnings"
    parts = [f'<div class="sd-check"><div class="sd-check-verdict sd-verdict-{"ok" if report.ok else "bad"}">'
             f'{verdict} <span class="sd-muted">({counts})</span></div>']
    for attribute, css, title in SECTIONS:
        items = list(getattr(report, attribute))
        if attribute == "info" and report.data.get("buckets"):
            items.append(buckets_line(report.data["buckets"]))
        if items:
            rows = "".join(f"<li>{html.escape(words(item))}</li>" for item in items)
            parts.append(f'<div class="{css}"><b>{title}</b><ul>{rows}</ul></div>')
    return "".join(parts) + "</div>"
