"""The pre-flight's memory changes on the Train tab: the ones the report lists (trainer/memory's
`changes_to_fit`, cumulative and cheapest first), and the form with all of them applied, with a sentence
saying which fields changed and the peak predicted after them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.ui.config_form import ConfigForm, to_widget
from trainer.preflight import Report
from trainer.run.gpu_memory import gb

# Where the report holds its changes: the estimate's `changes_to_fit` (trainer/preflight/estimate.py), or a
# `changes` list under the estimate or a memory section.
HOLDERS = (("estimate", "changes_to_fit"), ("estimate", "changes"), ("memory", "changes"))


@dataclass
class MemoryFill:
    updates: dict[str, Any] = field(default_factory=dict)  # form key -> new widget value, changed keys only
    sentence: str = ""


def listed_changes(report: Report | None) -> list[dict]:
    """The report's changes as plain dicts {label, overrides, peak_bytes} (kept in a gr.State until applied)."""
    if report is None:
        return []
    data = report.data
    found = next((data[section][key] for section, key in HOLDERS
                  if isinstance(data.get(section), dict) and data[section].get(key)), [])
    return [_as_dict(change) for change in found]


def _as_dict(change) -> dict:
    if isinstance(change, dict):
        return {"label": change.get("label", ""), "overrides": dict(change.get("overrides") or {}),
                "peak_bytes": change.get("peak_bytes")}
    return {"label": change.label, "overrides": dict(change.overrides), "peak_bytes": change.peak_bytes}


def apply_memory_changes(form: ConfigForm, changes: list[dict], current: Sequence[Any]) -> MemoryFill:
    """The form with every listed change's overrides set (a later change of the same key wins, as they are
    cumulative), given the widget values `current` in form.components order."""
    values = dict(zip(form.keys, current))
    wanted: dict[str, Any] = {}
    for change in changes:
        wanted.update(change["overrides"])
    fill, words, missing = MemoryFill(), [], []
    for key, value in wanted.items():
        if key not in form.fields or key not in values:
            missing.append(key)  # a key this version's form lacks: say so rather than drop it silently
            continue
        widget = to_widget(form.fields[key], value)
        if values[key] != widget:
            fill.updates[key] = widget
        words.append(f"{key} = {_literal(value)}")
    peak = changes[-1]["peak_bytes"] if changes else None
    if not words:
        fill.sentence = "No memory changes to apply: run Check with a memory budget first."
    else:
        fill.sentence = f"Set {', '.join(words)}" + (f"; predicted peak now {gb(peak)}" if peak else "") + "."
    if missing:
        fill.sentence += f" Not in this form: {', '.join(missing)}; set them with --set on the command line."
    return fill


def _literal(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)  # as --set and TOML spell it
