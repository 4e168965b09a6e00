"""`--set KEY=VALUE` overrides and laying one partial config over another."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from networks.errors import SdloraError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from trainer.config.fields import _annotation_at, _is_optional, _wants_text
from trainer.config.files import config_from_dict, config_to_dict
from trainer.config.sections import TrainConfig


def apply_overrides(cfg_or_dict: TrainConfig | Mapping[str, Any], overrides: Iterable[str],
                    source: str | None = None) -> TrainConfig:
    """Apply "dotted.key=value" overrides and validate.

    Values are TOML literals when they parse as one (2e-4, true, [1, 2], "quoted"), else plain text, so
    `model.path=/x/y` works; text fields always take the text as is, and `none` clears an optional key.
    """
    data = config_to_dict(cfg_or_dict) if isinstance(cfg_or_dict, TrainConfig) else _copy(dict(cfg_or_dict))
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(data, key, _parse_value(key, value), item)
    return config_from_dict(data, source=source)


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
        raise SdloraError(f"Override {item!r} must look like KEY=VALUE, e.g. train.learning_rate=2e-4.")
    return key, value.strip()


def _parse_value(key: str, text: str) -> Any:
    annotation = _annotation_at(key.split("."))
    optional = annotation is not None and _is_optional(annotation)
    if optional and text.lower() in ("none", "null"):
        return None
    quoted = text[:1] in ('"', "'")
    if annotation is not None and _wants_text(annotation) and not quoted:
        return text
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(data: dict, key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: depth + 1]), item)
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key, item)] = value
    else:
        node[last] = value


def _child(node: dict | list, part: str, path: str, item: str) -> dict | list:
    if isinstance(node, list):
        child = node[_list_index(node, part, path, item)]
    else:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
    if not isinstance(child, (dict, list)):
        raise SdloraError(f"Override {item!r}: {path} is a single value, not a section; check the key.")
    return child


def _list_index(node: list, part: str, path: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise SdloraError(f"Override {item!r}: {path} needs an index from 0 to {len(node) - 1}.")
    return int(part)


def merge_dicts(base: Mapping[str, Any], partial: Mapping[str, Any]) -> dict:
    """`base` with `partial` laid over it: tables merge key by key, anything else is replaced."""
    merged = {key: _copy(value) for key, value in base.items()}
    for key, value in partial.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = _copy(value)
    return merged


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
