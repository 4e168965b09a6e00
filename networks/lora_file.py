"""Reading and writing kohya-layout LoRA .safetensors files (docs/LORA_FORMAT.md).

A file holds only `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha` (0-dim float32);
everything else goes into the header as strings. Writes are atomic: a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import SdloraError

PORTABLE_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_lora(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write `state` atomically (temp file in the same folder, fsync, rename)."""
    check_portable(state, source=str(path))
    metadata = metadata or {}
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise SdloraError(f"Metadata values must be strings; '{bad[0]}' is {type(metadata[bad[0]]).__name__}.")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return target


def atomic_write(target: Path, write) -> None:
    """Run write(temp_path) then rename over `target`; the temp file is removed on any failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise SdloraError(f"Cannot write {target} ({error.strerror or error}); free disk space or choose a "
                          "writable folder, then resume from the last checkpoint.") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file; one-sentence errors for missing or foreign files."""
    source = Path(path)
    if not source.is_file():
        raise SdloraError(f"LoRA file '{source}' does not exist; check the path.")
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise SdloraError(f"'{source}' is not a readable .safetensors file ({_first_line(error)}); "
                          "choose a LoRA .safetensors file.") from None
    if not state:
        raise SdloraError(f"'{source}' holds no tensors; choose a LoRA .safetensors file.")
    return state, metadata


def check_portable(state: dict[str, torch.Tensor], source: str) -> None:
    foreign = [k for k in state if not k.endswith(PORTABLE_SUFFIXES) or "." not in k]
    if foreign:
        raise SdloraError(f"'{source}' has {len(foreign)} key(s) that are not lora_down/lora_up/alpha "
                          f"(e.g. '{foreign[0]}'); it is not a kohya-layout LoRA file.")
    for key, tensor in state.items():
        if key.endswith(".alpha") and (tensor.dim() != 0 or tensor.dtype != torch.float32):
            raise SdloraError(f"'{source}': {key} must be a 0-dim float32 tensor.")


def module_summary(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{name: {rank, alpha, shape_down, shape_up}} for inspection."""
    summary = {}
    for key, tensor in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        alpha = state.get(f"{name}.alpha")
        summary[name] = {"rank": int(tensor.shape[0]),
                         "alpha": float(alpha) if alpha is not None else float(tensor.shape[0]),
                         "down": list(tensor.shape), "up": list(state[f"{name}.lora_up.weight"].shape)}
    return summary


def to_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
