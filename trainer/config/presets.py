"""Presets: named partial configs (network type, r, alpha/r, learning rate...) laid over the defaults.

Built-in presets ship as presets/*.toml inside the installed package; user presets are TOML files in
$SDLORA_HOME/presets (default ~/.config/sdlora/presets). A config is resolved in layers, each over the
last: the defaults, the preset, `base` (a config file, the UI form, --model/--data/--output), then the
--set overrides. So a preset acts as a different set of defaults and never overrides what the user gave.
"""
from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import tomli_w

from networks.atomic import write_text_atomic
from networks.errors import SdloraError
from trainer.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    merge_dicts,
    parse_toml,
    read_toml,
)

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# Keys that describe one run on one machine, not a recipe: a saved preset leaves them out, or it would
# point every later run at the first run's data and folder.
RUN_SPECIFIC_KEYS = ("name", "dataset.path", "output.dir", "validation.folder", "dataset.mask_folder",
                     "network.weights")


@dataclass(frozen=True)
class PresetInfo:
    name: str
    source: Literal["builtin", "user"]
    path: str
    description: str            # the file's first comment line
    rank: int | None            # None (like the rest) when the file does not validate; see `error`
    alpha: float | None         # the resolved alpha
    alpha_ratio: float | None   # resolved alpha / rank, also when the preset gives an absolute alpha
    network_type: str | None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    error: str | None = None


def user_presets_dir() -> Path:
    home = os.environ.get("SDLORA_HOME")
    if home:
        return Path(home).expanduser() / "presets"
    config_home = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(config_home).expanduser() / "sdlora" / "presets"


def _builtin_files() -> dict[str, Traversable]:
    return {f.name[: -len(".toml")]: f for f in resources.files("presets").iterdir()
            if f.name.endswith(".toml") and f.is_file()}


def _user_files() -> dict[str, Path]:
    folder = user_presets_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in folder.glob("*.toml") if p.is_file()}


def builtin_names() -> list[str]:
    return sorted(_builtin_files())


def list_presets() -> list[PresetInfo]:
    """Built-in presets, then the user's (a user file named like a built-in one is shadowed), by name."""
    builtins = _builtin_files()
    users = {name: path for name, path in _user_files().items() if name not in builtins}
    infos = [_info(name, "builtin", f) for name, f in sorted(builtins.items())]
    return infos + [_info(name, "user", p) for name, p in sorted(users.items())]


def _info(name: str, source: Literal["builtin", "user"], file: Traversable | Path) -> PresetInfo:
    text = file.read_text(encoding="utf-8")
    description = _first_comment(text)
    try:
        net = config_from_dict(parse_toml(text, source=str(file)), source=str(file)).network
    except SdloraError as exc:
        # One broken user file must not hide the other presets from the UI's list.
        return PresetInfo(name, source, str(file), description, None, None, None, None, error=str(exc))
    uses_conv = net.adapts_convs
    return PresetInfo(name, source, str(file), description, net.rank, net.resolved_alpha,
                      net.resolved_alpha / net.rank, net.type,
                      net.conv_rank if uses_conv else None, net.resolved_conv_alpha if uses_conv else None)


def _first_comment(text: str) -> str:
    for line in text.splitlines():
        if line.strip().startswith("#"):
            return line.strip().lstrip("#").strip()
    return ""


def _find(name: str) -> tuple[Traversable | Path, str]:
    """The preset file for a name (built-in first, then the user's), or a path to any .toml file."""
    builtins = _builtin_files()
    if name in builtins:
        return builtins[name], "builtin"
    users = _user_files()
    if name in users:
        return users[name], "user"
    if name.endswith(".toml") and Path(name).is_file():
        return Path(name), "file"
    available = ", ".join(sorted(builtins) + sorted(set(users) - set(builtins)))
    raise SdloraError(f"Unknown preset {name!r}; available presets are: {available}.")


def load_preset(name: str) -> dict:
    """The preset's partial config as a dict (not validated on its own; resolve_config does that)."""
    file, _ = _find(name)
    if isinstance(file, Path):
        return read_toml(file)
    return parse_toml(file.read_text(encoding="utf-8"), source=str(file))


def preset_text(name: str) -> str:
    file, _ = _find(name)
    return file.read_text(encoding="utf-8")


def resolve_config(preset: str | None = None, overrides: Iterable[str] = (),
                   base: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the preset, then `base`, then the KEY=VALUE overrides, validated as one config."""
    preset_data = load_preset(preset) if preset else {}
    try:
        return apply_overrides(merge_dicts(preset_data, base or {}), list(overrides))
    except SdloraError:
        if preset:
            # Blame a broken preset on the preset file rather than on the keys the user gave.
            config_from_dict(preset_data, source=str(_find(preset)[0]))
        raise


def save_user_preset(name: str, cfg_or_partial: TrainConfig | Mapping[str, Any],
                     description: str | None = None, keep: Iterable[str] = ()) -> Path:
    """Write a user preset; a built-in name is refused. From a config: the keys that differ from the defaults
    plus the dotted keys in `keep`, defaults too (the UI keeps every field it shows). From a partial config:
    every key it names (an imported kohya_ss preset or a TOML file), defaults too. A preset sets only the keys
    it names, so a key left out at its default would keep whatever the form held before it was chosen."""
    if not _NAME.fullmatch(name):
        raise SdloraError(f"Preset name {name!r} is not usable; use lower-case letters, digits, '-', '_' "
                          f"and '.', starting with a letter or digit.")
    if name in _builtin_files():
        raise SdloraError(f"{name!r} is a built-in preset and cannot be overwritten; choose another name.")
    if isinstance(cfg_or_partial, TrainConfig):
        cfg = cfg_or_partial
        values = config_to_dict(cfg)
        partial = _differences(values, config_to_dict(TrainConfig()))
        for dotted in keep:
            _copy_key(values, partial, dotted)
    else:
        cfg = config_from_dict(cfg_or_partial)
        partial = copy.deepcopy(dict(cfg_or_partial))
    comment = description or f"User preset {name}: {_summary(cfg)}."
    header = f"# {comment}\n# Saved by sdlora; a partial config over the defaults.\n\n"
    return write_text_atomic(user_presets_dir() / f"{name}.toml", header + tomli_w.dumps(_without_run_keys(partial)))


def _copy_key(source: dict, target: dict, dotted: str) -> None:
    """Copy the value at the dotted key from `source` into `target`, making the sections it needs."""
    *sections, leaf = dotted.split(".")
    for section in sections:
        source, target = source.get(section, {}), target.setdefault(section, {})
    if leaf in source and source[leaf] is not None:  # TOML has no null: an unset optional key stays unnamed
        target[leaf] = copy.deepcopy(source[leaf])


def _differences(values: dict, defaults: dict) -> dict:
    """The entries of `values` that differ from `defaults`, keeping the section nesting."""
    diff = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict) and key != "optimizer_args":
            inner = _differences(value, default)
            if inner:
                diff[key] = inner
        elif value != default:
            diff[key] = value
    return diff


def _without_run_keys(partial: dict) -> dict:
    for dotted in RUN_SPECIFIC_KEYS:
        *sections, leaf = dotted.split(".")
        node = partial
        for section in sections:
            node = node.get(section, {})
        node.pop(leaf, None)
    return {key: value for key, value in partial.items() if value != {}}


def _summary(cfg: TrainConfig) -> str:
    net = cfg.network
    text = f"{net.type} r {net.rank}, alpha {_num(net.resolved_alpha)}"
    if net.adapts_convs:
        text += f", conv r {net.conv_rank}, conv alpha {_num(net.resolved_conv_alpha)}"
    return text + f", lr {cfg.train.learning_rate:g}"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:g}"


# --------------------------------------------------------------------------- `sdlora presets ...` bodies

def presets_list_text() -> str:
    """`sdlora presets list`: a table of every preset."""
    header = ("name", "source", "type", "r", "alpha", "alpha/r", "description")
    rows = [header] + [(p.name, p.source, p.network_type or "?", _num(p.rank), _num(p.alpha),
                        _num(p.alpha_ratio), p.error or p.description) for p in list_presets()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def presets_show_text(name: str) -> str:
    """`sdlora presets show NAME`: the preset's TOML, then what it resolves to."""
    net = resolve_config(name).network
    resolved = (f"# resolved: {net.type}, r {net.rank}, alpha {_num(net.resolved_alpha)} "
                f"(alpha/r {_num(net.resolved_alpha / net.rank)})")
    if net.adapts_convs:
        resolved += f", conv r {net.conv_rank}, conv alpha {_num(net.resolved_conv_alpha)}"
    return preset_text(name).rstrip("\n") + "\n\n" + resolved + "\n"


def presets_save_text(name: str, from_file: str | os.PathLike) -> str:
    """`sdlora presets save NAME --from FILE.toml`: validate the file and store it as a user preset."""
    cfg = load_config(from_file)
    path = save_user_preset(name, read_toml(from_file), description=f"User preset {name} (from {Path(from_file).name}): "
                                                   f"{_summary(cfg)}.")
    return f"Saved preset {name!r} to {path}.\n"
