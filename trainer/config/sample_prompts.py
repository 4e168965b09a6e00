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
# Options kohya reads that have no per-prompt counterpart here: reported, never taken as prompt text.
KOHYA_ONLY = ("ss", "cn", "am", "f", "g", "gr", "fs", "t")
NUMBERS = {"width": int, "height": int, "seed": int, "steps": int, "cfg": float}
OPTION_HELP = "--n negative prompt, --w width, --h height, --d seed, --s steps, --l CFG scale"
# Split only before option names kohya knows (any case, as kohya matches them), so "a photo --no people"
# keeps its text.
_NAMES = "|".join(sorted((*OPTIONS, *KOHYA_ONLY), key=len, reverse=True))
_SPLIT = re.compile(rf"\s+--(?=(?:{_NAMES})(?:\s|$))", re.IGNORECASE)


def parse_prompt_line(line: str, where: str = "a sample prompt") -> tuple[dict[str, Any], list[str]]:
    """({"prompt": ..., field: value, ...}, [kohya options sdlora has no per-prompt setting for, e.g. "ss"])."""
    text, *options = _SPLIT.split(line.strip())
    prompt: dict[str, Any] = {"prompt": text.strip()}
    ignored = []
    for option in options:
        name, _, value = option.partition(" ")
        name, value = name.strip().lower(), value.strip()
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
        number = float(value)
        if kind is int and not number.is_integer():
            raise ValueError
        return kind(number)
    except ValueError:
        word = "a whole number" if kind is int else "a number"
        raise SdloraError(f"--{name} in {where} must be {word} (got {value!r}).") from None


def parse_prompt_text(text: str, where: str = "the sample prompts",
                      comments: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Every non-empty line (and with `comments`, as in kohya's prompt files, none starting with #); and the
    ignored option names, each once."""
    prompts, ignored = [], []
    for number, line in enumerate((text or "").splitlines(), 1):
        if not line.strip() or (comments and line.lstrip().startswith("#")):
            continue
        prompt, unknown = parse_prompt_line(line, f"line {number} of {where}")
        prompts.append(prompt)
        ignored += [name for name in unknown if name not in ignored]
    return prompts, ignored


def format_prompt_line(prompt: Any, defaults: Any) -> str:
    """The line for a SamplePrompt: its text, then every option whose value is not the default; it parses
    back to the same prompt (floats are written exactly)."""
    parts = [prompt.prompt]
    for name, field in OPTIONS.items():
        value = getattr(prompt, field)
        if value != getattr(defaults, field):
            parts.append(f"--{name} {_exact(value)}")
    return " ".join(parts)


def _exact(value: Any) -> str:
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)
