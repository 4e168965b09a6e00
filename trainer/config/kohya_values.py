"""Reading kohya_ss's loosely typed preset values (strings for numbers, "" for unset) and the builder that
collects the imported config, its unmapped keys and notes: shared by the preset import (kohya_import.py) and
its network part (kohya_network.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from networks.errors import SdloraError
from trainer.config import config_field_table

CONFIG_FIELDS = {field.key: field for field in config_field_table()}


# -- reading kohya_ss's loosely typed values ------------------------------------------------------------
def is_blank(value: Any) -> bool:
    return value is None or value == "" or value is False or value == 0 or value == "0"


def read_number(key: str, value: Any, source: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SdloraError(f"{key} in {source} is {value!r}, not a number; fix it in the file.") from None
    if not math.isfinite(number):
        raise SdloraError(f"{key} in {source} is {value!r}; use a finite number.")
    return number


def read_integer(key: str, value: Any, source: str) -> int:
    number = read_number(key, value, source)
    if not number.is_integer():
        raise SdloraError(f"{key} in {source} is {value!r}, not a whole number; fix it in the file.")
    return int(number)


def read_flag(key: str, value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1"):
        return True
    if str(value).strip().lower() in ("false", "0", ""):
        return False
    raise SdloraError(f"{key} in {source} is {value!r}, not true or false; fix it in the file.")


def read_text(key: str, value: Any, source: str) -> str:
    return str(value).strip()


def reader_for(dotted: str) -> Callable[[str, Any, str], Any]:
    """How kohya_ss's loosely typed value is read for a key: by the sdlora key's own type."""
    field = CONFIG_FIELDS[dotted]
    kind = field.type
    if kind.startswith("int") or (field.choices and all(isinstance(c, int) for c in field.choices)):
        return read_integer
    if kind.startswith("float"):
        return read_number
    return read_flag if kind == "bool" else read_text


class Builder:
    """Collects the partial config, the unmapped keys and the notes while the keys are converted."""

    def __init__(self, data: Mapping[str, Any], source: str):
        self.data, self.source = data, source
        self.config: dict = {}
        self.unmapped: dict[str, Any] = {}
        self.notes: list[str] = []

    def given(self, key: str) -> bool:
        value = self.data.get(key)
        return value is not None and not (isinstance(value, str) and value.strip() == "")

    def choose(self, key: str, dotted: str, choices: Mapping[str, str]) -> None:
        """Set `dotted` to choices[value of `key`], or list the value as unmapped when sdlora has no such choice."""
        if self.given(key):
            value = str(self.data[key]).strip()
            if value in choices:
                self.set(dotted, choices[value])
            else:
                self.unmapped[key] = value

    def set(self, dotted: str, value: Any) -> None:
        *sections, leaf = dotted.split(".")
        node = self.config
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
