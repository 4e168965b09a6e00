"""Sample prompts as kohya writes them, one per line: `a cat --n blurry --w 512 --h 768 --d 42 --s 28 --l 7`.

kohya_ss prompt files and GUI presets use this syntax, so users paste them as they are; the UI shows a
run's prompts the same way, so what a line says is what gets drawn. Hand-parsed because the format is
kohya's own (options split at " --", a one- or two-letter name, then the value); `#` lines are comments.
"""

from __future__ import annotations

import re
from typing import Any

from networks.errors import SdloraError

# kohya's option letter -> SamplePrompt field (its --ss sampler is per run here: sample.sampler)
OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "cfg"}
NUMBERS = {"width": int, "height": int, "seed": int, "steps": int, "cfg": float}
OPTION_HELP = "--n negative prompt, --w width, --h height, --d seed, --s steps, --l CFG scale"
_SPLIT = re.compile(r"\s+--(?=[A-Za-z])")


def parse_prompt_line(line: str, where: str = "a sample prompt") -> tuple[dict[str, Any], list[str]]:
    """({"prompt": ..., field: value, ...}, [options this format knows but sdlora ignores, e.g. "ss"])."""
    text, *options = _SPLIT.split(line.strip())
    prompt: dict[str, Any] = {"prompt": text.strip()}
    ignored = []
    for option in options:
        name, _, value = option.partition(" ")
        name, value = name.strip(), value.strip()
        field = OPTIONS.get(name)
        if field is None:
            ignored.append(name)
            continue
        prompt[field] = _value(field, value, name, where)
    return prompt, ignored


def _value(field: str, value: str, name: str, where: str) -> Any:
    kind = NUMBERS.get(field)
    if kind is None:
        return value
    try:
        return kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
    except ValueError:
        raise SdloraError(f"--{name} in {where} must be a number (got {value!r}).") from None


def parse_prompt_text(text: str, where: str = "the sample prompts") -> tuple[list[dict[str, Any]], list[str]]:
    """Every non-empty, non-comment line; and the ignored option names (each once)."""
    prompts, ignored = [], []
    for number, line in enumerate((text or "").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, unknown = parse_prompt_line(line, f"line {number} of {where}")
        prompts.append(prompt)
        ignored += [name for name in unknown if name not in ignored]
    return prompts, ignored


def format_prompt_line(prompt: Any, defaults: Any) -> str:
    """The line for a SamplePrompt: its text, then every option whose value is not the default."""
    parts = [prompt.prompt]
    for name, field in OPTIONS.items():
        value = getattr(prompt, field)
        if value != getattr(defaults, field):
            parts.append(f"--{name} {value:g}" if isinstance(value, float) else f"--{name} {value}")
    return " ".join(parts)
