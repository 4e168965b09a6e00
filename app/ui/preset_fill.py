"""What choosing a preset does to the Train form: it sets the keys the preset names, nothing else, and
says which fields changed.

A preset is a partial config (presets/*.toml), so the keys it is silent about keep what the form holds
(typed values, or what an earlier preset set). The base model and the output name are the user's own: a
preset fills them only over a placeholder (empty, the default, a demo model or another preset's value),
never over something typed, and says so when it keeps one.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.ui.config_form import PROMPTS_KEY, ConfigForm, from_widget, prompts_to_text, to_widget
from networks.errors import SdloraError
from trainer.config.presets import list_presets, load_preset, resolve_config

OWN_KEYS = ("model.path", "name")  # what one user's run is about, not a recipe
SHOWN_CHANGES = 8  # the notice lists this many changed fields, then counts the rest


@dataclass
class PresetFill:
    updates: dict[str, Any] = field(default_factory=dict)  # form key -> new widget value, changed keys only
    prompts: str | None = None  # the new sample prompts text, when the preset sets them
    sentence: str = ""


def fill_from_preset(form: ConfigForm, name: str, current: Sequence[Any], prompts_text: str) -> PresetFill:
    """The form after choosing `name`, given the widget values `current` (in form.components order)."""
    given = load_preset(name)
    cfg = resolve_config(name).model_dump(mode="python")
    fill, changes, kept = PresetFill(), [], []
    for key, value in zip(form.keys, current):
        if not _sets(given, key):
            continue
        spec = form.fields[key]
        wanted = to_widget(spec, _get(cfg, key))
        if _same(spec, value, _get(cfg, key)):
            continue
        if key in OWN_KEYS and not _placeholder(key, value, spec.default):
            kept.append(f"{form.label(key)} {_shown(value)} (it suggests {_shown(wanted)})")
            continue
        fill.updates[key] = wanted
        changes.append(f"{form.label(key)} {_shown(wanted)} (was {_shown(value)})")
    if _sets(given, PROMPTS_KEY):
        text = prompts_to_text(resolve_config(name))
        if text.strip() != (prompts_text or "").strip():
            fill.prompts = text
            changes.append("Sample prompts")
    fill.sentence = _sentence(name, changes, kept)
    return fill


def _sentence(name: str, changes: list[str], kept: list[str]) -> str:
    if not changes:
        text = f"Preset {name} changed nothing: the form already holds the settings it sets."
    else:
        listed = ", ".join(changes[:SHOWN_CHANGES])
        more = f" and {len(changes) - SHOWN_CHANGES} more" if len(changes) > SHOWN_CHANGES else ""
        text = f"Preset {name} set {listed}{more}; every other field is as it was."
    if kept:
        text += " It kept your " + "; your ".join(kept) + "."
    return text


def _sets(given: dict, key: str) -> bool:
    node: Any = given
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _get(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _same(spec, widget_value: Any, config_value: Any) -> bool:
    try:
        return from_widget(spec, widget_value) == config_value
    except SdloraError:
        return False  # half-typed text differs from any preset value


def _placeholder(key: str, value: Any, default: Any) -> bool:
    """Whether the field holds a value nobody typed: empty, the default, a demo model, a preset's value."""
    text = str(value or "").strip()
    if not text or text == str(default) or (key == "model.path" and text.startswith("demo:")):
        return True
    return any(text == str(_get(load_preset(p.name), key)) for p in list_presets() if not p.error)


def _shown(value: Any) -> str:
    if value is None or value == "":
        return "empty"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)
