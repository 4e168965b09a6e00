"""The training form as a view of TrainConfig: widgets are generated from `config_field_table`.

There is no second list of fields here: a key's widget, label, help text and choices all come from the
config model, so a key added to trainer/config.py appears in the Advanced section by itself. The form
holds a complete config (choosing a preset fills every widget), and reading it back goes through the
same validation as a config file; `in_words` then puts the error the way the page shows it, with the
field's label and what was typed: "Rank r must be an integer >= 1; you typed 0."
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from networks.errors import SdloraError
from trainer.config import ConfigError, ConfigField, SamplePrompt, TrainConfig, config_field_table
from trainer.config.presets import resolve_config, save_user_preset
from trainer.config.sample_prompts import OPTION_HELP, format_prompt_line, parse_prompt_text

PROMPTS_KEY = "sample.prompts"  # edited as one prompt per line in the main form
SKIPPED_KEYS = ("output.dir",)  # the run manager sets it to the new run's folder
SECTION_TITLES = {"": "General", "model": "Model", "dataset": "Dataset", "network": "Network", "train": "Training",
                  "sample": "Samples", "save": "Saving", "output": "Output", "validation": "Validation",
                  "ema": "EMA"}
PER_ROW = 3
OPTIONAL_NUMBERS = ("int | None", "float | None")


class ConfigForm:
    """Widgets keyed by dotted config key; `components` is the order event handlers receive them in."""

    def __init__(self, initial: TrainConfig | None = None):
        self.fields: dict[str, ConfigField] = {f.key: f for f in config_field_table()}
        self.widgets: dict[str, gr.components.Component] = {}
        self._initial = (initial or TrainConfig()).model_dump(mode="python")
        self._advanced: set[str] = set()  # keys whose widget is in the Advanced section

    @property
    def keys(self) -> list[str]:
        return list(self.widgets)

    @property
    def components(self) -> list[gr.components.Component]:
        return list(self.widgets.values())

    def label(self, key: str) -> str:
        """The words the page shows for `key` (what error messages and notices call it); an Advanced
        field also names its section, since labels repeat there ("Every steps" of Samples and of Saving)."""
        widget = self.widgets.get(key)
        if widget is None or not widget.label:
            return key
        if key in self._advanced:
            return f"{widget.label} (Advanced, {SECTION_TITLES.get(section_of(key), section_of(key))})"
        return str(widget.label)

    def in_words(self, message: str) -> str:
        """`message` with every dotted config key replaced by its field's label, but in `--set KEY=VALUE`,
        which is a command line to copy as it stands."""
        for key in sorted((k for k in self.widgets if "." in k), key=len, reverse=True):
            message = re.sub(rf"(?<![\w.])(?<!--set ){re.escape(key)}(?![\w.])", lambda _, k=key: self.label(k),
                             message)
        return message

    def add(self, key: str, **options) -> gr.components.Component:
        """Create (inside the current layout) the widget for `key`; `options` refine label, info, scale."""
        field = self.fields[key]
        widget = make_widget(field, value=to_widget(field, _get(self._initial, key)), **options)
        self.widgets[key] = widget
        return widget

    def add_remaining(self) -> None:
        """Every key not in the main form, one accordion per config section (inside the Advanced one)."""
        remaining = [f for f in self.fields.values()
                     if f.key not in self.widgets and f.key not in SKIPPED_KEYS and f.key != PROMPTS_KEY]
        sections: dict[str, list[ConfigField]] = {}
        for field in remaining:
            sections.setdefault(section_of(field.key), []).append(field)
        for section, fields in sections.items():
            title = f"{SECTION_TITLES.get(section, section.title())} ({len(fields)})"
            with gr.Accordion(title, open=False, elem_id=f"advanced-{section or 'general'}"):
                for start in range(0, len(fields), PER_ROW):
                    with gr.Row(equal_height=True):
                        for field in fields[start:start + PER_ROW]:
                            self.add(field.key)
                            self._advanced.add(field.key)

    # -- values ---------------------------------------------------------------------------------
    def to_config(self, preset: str | None, prompts_text: str, values: Sequence[Any]) -> TrainConfig:
        """The validated config the form describes; the preset only fills keys the form lacks. An error
        names the field by its label and says what was typed."""
        typed = dict(zip(self.keys, values))
        try:
            data: dict = {}
            for key, value in typed.items():
                _set(data, key, from_widget(self.fields[key], value))
            _set(data, PROMPTS_KEY, prompts_from_text(prompts_text))
            return resolve_config(preset or None, base=data)
        except ConfigError as error:
            raise SdloraError(self._error_sentence(error, typed)) from None
        except SdloraError as error:  # from_widget's: about a value typed in the form
            raise SdloraError(self.in_words(_you_typed(str(error)))) from None

    def save_as_preset(self, name: str, preset: str | None, prompts_text: str, values: Sequence[Any]) -> Path:
        """Save the form as user preset `name`, naming every field, defaults too: a preset sets only the keys
        it names, so one that left out a default would let the previous preset's value stay when chosen."""
        cfg = self.to_config(preset, prompts_text, values)
        return save_user_preset(name, cfg, keep=[*self.keys, PROMPTS_KEY])

    def _error_sentence(self, error: ConfigError, typed: dict) -> str:
        key, message = error.key, str(error)
        if key in typed and typed[key] is None:
            # A number box sends nothing for text that is not a number, so the typed text is unknown here.
            example = to_widget(self.fields[key], self.fields[key].default)
            hint = f", e.g. {example}" if example not in (None, "") else ""
            return f"{self.label(key)} is empty or not a number; type a number{hint}."
        return self.in_words(_you_typed(message) if key in typed else message)

    def values(self, cfg: TrainConfig) -> list[Any]:
        """Widget values showing `cfg`, in `components` order."""
        data = cfg.model_dump(mode="python")
        return [to_widget(self.fields[key], _get(data, key)) for key in self.keys]


def _you_typed(message: str) -> str:
    """'... (got 0).' -> '...; you typed 0.': the value came from the form, so say it as the person did it."""
    return re.sub(r" \(got (.*)\)\.$", r"; you typed \1.", message)


def section_of(key: str) -> str:
    return key.split(".", 1)[0] if "." in key else ""


def make_widget(field: ConfigField, value: Any = None, label: str | None = None, info: str | None = None,
                **options):
    kind = field.type
    label = label or field.key.rsplit(".", 1)[-1].replace("_", " ").capitalize()
    info = info if info is not None else f"{field.description} ({field.key})"
    common = dict(label=label, info=info, elem_id="cfg-" + field.key.replace(".", "-"), **options)
    if field.choices:
        return gr.Dropdown(choices=list(field.choices), value=value, **common)
    if kind == "bool":
        return gr.Checkbox(value=value, **common)
    if kind == "int":
        return gr.Number(value=value, precision=0, step=1, **common)
    if kind == "float":
        return gr.Number(value=value, step=_float_step(field), **common)
    if kind in OPTIONAL_NUMBERS:
        # A text box, because gradio's Number shows an empty value as 0 once it is on screen, and
        # "empty" must stay "not set" (e.g. no max_steps: train all the epochs).
        return gr.Textbox(value=value, placeholder="empty = not set", **common)
    if kind in ("str", "str | None"):
        return gr.Textbox(value=value, **common)
    return gr.Textbox(value=value, placeholder="JSON", **common)  # lists and tables


def _float_step(field: ConfigField) -> float:
    if field.bounds.get("le") == 1:
        return 0.01  # probabilities
    if "learning_rate" in field.key or field.key.endswith("_lr"):
        return 1e-5
    return 0.1


def _is_structured(field: ConfigField) -> bool:
    return field.type.startswith(("list", "dict"))


def to_widget(field: ConfigField, value: Any) -> Any:
    if _is_structured(field):
        if value is None:
            return ""
        return json.dumps(value.model_dump() if hasattr(value, "model_dump") else value)
    if field.type in OPTIONAL_NUMBERS:
        return "" if value is None else str(value)
    if value is None and field.type in ("str", "str | None"):
        return ""
    return value


def from_widget(field: ConfigField, value: Any) -> Any:
    """A widget's value as the config expects it; empty optional fields become None (unset)."""
    optional = field.type.endswith("| None")
    if _is_structured(field):
        text = (value or "").strip()
        if not text:
            return None if optional else ([] if field.type.startswith("list") else {})
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise SdloraError(f"{field.key} must be JSON, e.g. {json.dumps(field.default if field.default is not None else [])}"
                              f" (got {text[:40]!r}).") from None
    if isinstance(value, str) and optional and not value.strip():
        return None
    if field.type in OPTIONAL_NUMBERS:
        return _number(field, value)
    if isinstance(value, float) and field.type.startswith("int") and value.is_integer():
        return int(value)
    return value


def _number(field: ConfigField, text: Any) -> int | float:
    try:
        number = float(str(text).strip())
    except ValueError:
        raise SdloraError(f"{field.key} must be a number or empty (got {str(text).strip()!r}).") from None
    return int(number) if field.type.startswith("int") and number.is_integer() else number


def prompts_from_text(text: str) -> list[dict]:
    """One prompt per line with kohya's options (--n, --w, --h, --d, --s, --l); what a line says is what is
    drawn: an option left out takes its default (seed 0, 20 steps, CFG 7, dataset.resolution)."""
    prompts, ignored = parse_prompt_text(text, "the sample prompts")
    if ignored:
        raise SdloraError(f"The sample prompts use --{ignored[0]}, which sdlora has no per-prompt setting for "
                          f"(the sampler is sample.sampler, one per run); remove it. The options are {OPTION_HELP}.")
    return prompts


def prompts_to_text(cfg: TrainConfig) -> str:
    defaults = SamplePrompt(prompt="")
    return "\n".join(format_prompt_line(p, defaults) for p in cfg.sample.prompts)


def _set(data: dict, key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    for section in sections:
        data = data.setdefault(section, {})
    data[leaf] = value


def _get(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data
