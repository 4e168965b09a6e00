"""Reading and writing configs: TOML files in, validated `TrainConfig` out, and back (atomically)."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from networks.atomic import write_text_atomic
from networks.errors import SdloraError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from trainer.config.errors import ConfigError, _in, _show, config_error
from trainer.config.sections import TrainConfig


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and validate a TOML config file (a full config or a partial one over the defaults)."""
    return config_from_dict(read_toml(path), source=str(path))


def read_toml(path: str | os.PathLike) -> dict:
    """A TOML file as a dict; a missing file or a syntax error becomes one sentence naming the file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SdloraError(f"Config file {path} does not exist; check the path.") from None
    except UnicodeDecodeError:
        raise SdloraError(f"Config file {path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as exc:
        raise SdloraError(f"Cannot read config file {path} ({exc.strerror}); check the path.") from None
    return parse_toml(text, source=str(path))


def parse_toml(text: str, source: str = "the config") -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SdloraError(_toml_error_sentence(str(exc), source)) from None


def _toml_error_sentence(message: str, source: str) -> str:
    where = re.search(r"\(at line (\d+), column (\d+)\)", message)
    reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", message).rstrip(".")
    reason = reason[:1].lower() + reason[1:]
    place = f" at line {where.group(1)}, column {where.group(2)}" if where else ""
    if "(at end of document)" in message:
        place = " at the end of the file"
    return f"Invalid TOML in {source}{place}: {reason}; fix the syntax there."


def config_from_dict(data: Mapping[str, Any], source: str | None = None) -> TrainConfig:
    """Validate a (partial) config dict; `source` (a file name) is named in error messages."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"The config{_in(source)} must be a table of settings (got {_show(data)}).", "", source)
    try:
        return TrainConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise config_error(exc, source) from None


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain dict of every key, without the unset optional ones (TOML has no null)."""
    # mode="python" keeps inf as a float; mode="json" would turn it into null.
    return cfg.model_dump(mode="python", exclude_none=True)


def dump_config(cfg: TrainConfig) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the full config as TOML, atomically, so a crash never leaves half a file."""
    return write_text_atomic(path, dump_config(cfg))
