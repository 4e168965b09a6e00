"""The field table the UI builds its form from: every leaf key with its type, default, bounds and choices."""
from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

from pydantic import BaseModel

from trainer.config.sections import TrainConfig


class ConfigField(NamedTuple):
    key: str                       # dotted path, e.g. "network.rank"
    type: str                      # e.g. "int", "float | None", "choice", "list[SamplePrompt]"
    default: Any
    description: str
    choices: tuple | None          # the allowed values of a choice field
    bounds: dict[str, float]       # any of ge, gt, le, lt, multiple_of


def config_field_table(model_cls: type[BaseModel] = TrainConfig, prefix: str = "") -> list[ConfigField]:
    """Every leaf key of a config model, in declaration order (sections are walked into)."""
    rows = []
    for name, field in model_cls.model_fields.items():
        key = prefix + name
        if _is_model(field.annotation):
            rows.extend(config_field_table(field.annotation, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append(ConfigField(key, _type_name(field.annotation), default, field.description or "",
                                _choices(field.annotation), _bounds(field.metadata)))
    return rows


def config_keys(model_cls: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key, sections and leaves, with list items' keys as e.g. sample.prompts.seed."""
    keys = []
    for name, field in model_cls.model_fields.items():
        key = prefix + name
        keys.append(key)
        inner = _item_model(field.annotation)
        if inner is not None:
            keys.extend(config_keys(inner, key + "."))
    return keys


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "choice"
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _choices(tp: Any) -> tuple | None:
    for arm in _arms(tp):
        if get_origin(arm) is Literal:
            return get_args(arm)
    return None


def _bounds(metadata: Sequence[Any]) -> dict[str, float]:
    # Field(ge=1) is stored as annotated_types.Ge(ge=1) in the field's metadata, and so on.
    bounds = {}
    for item in metadata:
        for name in ("ge", "gt", "le", "lt", "multiple_of"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    return bounds


def _arms(tp: Any) -> tuple:
    """The alternatives of a union (or the type alone), without None."""
    if get_origin(tp) in (Union, types.UnionType):
        return tuple(a for a in get_args(tp) if a is not type(None))
    return (tp,)


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _item_model(tp: Any) -> type[BaseModel] | None:
    """The model inside a section or a list of models, else None."""
    for arm in _arms(tp):
        if _is_model(arm):
            return arm
        if get_origin(arm) is list and _is_model(get_args(arm)[0]):
            return get_args(arm)[0]
    return None


def _wants_text(tp: Any) -> bool:
    arms = _arms(tp)
    literal_text = all(get_origin(a) is Literal and all(isinstance(v, str) for v in get_args(a)) for a in arms)
    return arms == (str,) or literal_text


def _annotation_at(parts: Sequence[str | int]) -> Any:
    """The annotation of the key at `parts` (names; list indices as ints or digit strings), or None."""
    tp: Any = TrainConfig
    for part in parts:
        inner = _unwrap(tp)
        if _is_model(inner):
            field = inner.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif get_origin(inner) is list and str(part).isdigit():
            tp = get_args(inner)[0]
        elif get_origin(inner) is dict and isinstance(part, str):
            tp = get_args(inner)[1]
        else:
            return None  # past a leaf, or a union's branch tag in a pydantic loc
    return tp if parts else None


def _unwrap(tp: Any) -> Any:
    """int for Annotated[int, ...] and for int | None; a union of several types stays as it is."""
    if get_origin(tp) is Annotated:
        return _unwrap(get_args(tp)[0])
    arms = _arms(tp)
    return _unwrap(arms[0]) if len(arms) == 1 and arms[0] is not tp else tp
