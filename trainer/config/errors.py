"""Validation errors as one sentence naming the dotted key, e.g. "network.rank must be an integer >= 1 (got 0).";
an unknown key names the closest real one (or the sdlora name of a kohya key)."""
from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, get_origin

from pydantic import ValidationError

from networks.errors import SdloraError
from trainer.config.fields import _annotation_at, _arms, _choices, _unwrap, config_keys
from trainer.config.kohya_names import KOHYA_KEYS, OTHER_NAMES


class ConfigError(SdloraError):
    """A config that failed validation; `key` is the dotted key at fault ("" for the whole file)."""

    def __init__(self, message: str, key: str = "", source: str | None = None):
        super().__init__(message)
        self.key = key
        self.source = source


def config_error(exc: ValidationError, source: str | None = None) -> ConfigError:
    """The first problem of a pydantic ValidationError as one user-facing sentence."""
    errors = exc.errors(include_url=False)
    # A misspelt key explains the other errors (e.g. a "required" one), so it is reported first.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    kind = err["type"]
    loc = _field_loc(err["loc"], kind)
    key = _dotted(loc)
    if kind == "sdlora_rule":
        message = f"In {source}, {err['msg']}." if source else f"{err['msg']}."
        return ConfigError(message, key, source)
    if kind == "extra_forbidden":
        return ConfigError(_unknown_key_sentence(loc, key, source), key, source)
    return ConfigError(f"{key}{_in(source)} {_value_problem(err, loc)}.", key, source)


def _field_loc(loc: Sequence[str | int], kind: str) -> tuple:
    """The loc without pydantic's union-branch tags (e.g. the 'float' in train.optimizer_args.betas.float)."""
    if kind == "extra_forbidden":
        return tuple(loc)  # ends in the unknown key, which has no annotation by definition
    for end in range(len(loc), 0, -1):
        if _annotation_at(loc[:end]) is not None:
            return tuple(loc[:end])
    return tuple(loc)


def _dotted(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _in(source: str | None) -> str:
    return f" in {source}" if source else ""


def _unknown_key_sentence(loc: tuple, key: str, source: str | None) -> str:
    suggestion = _closest_key(loc)
    hint = f"did you mean {suggestion!r}?" if suggestion else "remove it or check the spelling."
    return f"Unknown config key {key!r}{_in(source)}; {hint}"


def _closest_key(loc: tuple) -> str | None:
    names = [str(p) for p in loc if not isinstance(p, int)]
    wanted, leaf = ".".join(names), names[-1]
    keys = config_keys()
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]  # the right key in the wrong section
    known = {**KOHYA_KEYS, **OTHER_NAMES}
    if leaf in known:
        return known[leaf]
    # Compare with keys as deep as the unknown one first, so train.lrate finds a key, not the section.
    depth = wanted.count(".")
    match = (difflib.get_close_matches(wanted, [k for k in keys if k.count(".") == depth], n=1, cutoff=0.6)
             or difflib.get_close_matches(wanted, keys, n=1, cutoff=0.6))
    if not match:
        return None
    parent = wanted.rpartition(".")[0]
    if match[0].rpartition(".")[0] == parent:
        # Keep the user's list index, e.g. sample.prompts[0].promt -> sample.prompts[0].prompt.
        return _dotted(loc[:-1] + (match[0].rsplit(".", 1)[-1],))
    return match[0]


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text in quotes"}


_LIMITS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def _value_problem(err: dict, loc: tuple) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, f" (got {_show(err['input'])})"
    annotation = _annotation_at(loc)
    word = _type_word(annotation)
    if kind == "missing":
        return "is required"
    if kind == "finite_number":  # before the union's list: a number arm was the one meant
        return f"must be a finite number{got}"
    if annotation is not None and len(_arms(annotation)) > 1 and not _choices(annotation):
        return f"must be {word}{got}"  # a union: every arm failed, so name them all
    if kind in _LIMITS:
        name, sign = _LIMITS[kind]
        return f"must be {word} {sign} {_number(ctx[name])}{got}"
    if kind == "multiple_of":
        return f"must be a multiple of {ctx['multiple_of']}{got}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}{got}"
    if kind == "sdlora_value":
        return f"{err['msg']}{got}"
    if kind in ("string_too_short", "string_too_long"):
        return f"{err['msg'].lower()}{got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a table of settings{got}"
    if kind == "list_type":
        return f"must be a list{got}"
    return f"must be {word}{got}"


def _type_word(annotation: Any) -> str:
    if annotation is None:
        return "a valid value"
    arms = _arms(_unwrap(annotation))
    words = [_WORDS.get(a, "a list of numbers" if get_origin(a) is list else "a valid value") for a in arms]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _number(value: float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
