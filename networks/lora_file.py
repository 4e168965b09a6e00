"""Reading and writing kohya-layout LoRA .safetensors files (docs/LORA_FORMAT.md).

A file holds only `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha` (0-dim float32), or
for LyCORIS LoHa/LoKr modules their `hada_*` / `lokr_*` tensors and alpha (networks/lycoris_keys.py);
everything else goes into the header as strings. Writes are atomic: a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapter import ALPHA
from .atomic import atomic_write
from .errors import SdloraError
from .loha import HADA_W1_B
from .lokr import LOKR_W1_A, LOKR_W2_A
from .lora import LORA_DOWN, LORA_KEYS, LORA_UP
from .lycoris_keys import ALL_SUFFIXES, group_modules, module_algo
from .oft import OFT_BLOCKS

PORTABLE_SUFFIXES = (*LORA_KEYS, ALPHA)  # LoRA/LoCon; LyCORIS adds ALL_SUFFIXES
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
    foreign = [k for k in state if k.split(".", 1)[-1] not in ALL_SUFFIXES or "." not in k]
    if foreign:
        raise SdloraError(f"'{source}' has {len(foreign)} key(s) that are not lora_down/lora_up/alpha "
                          f"(nor LyCORIS hada_*/lokr_*) (e.g. '{foreign[0]}'); it is not a kohya-layout LoRA file.")
    for key, tensor in state.items():
        if key.endswith(f".{ALPHA}") and (tensor.dim() != 0 or tensor.dtype != torch.float32):
            raise SdloraError(f"'{source}': {key} must be a 0-dim float32 tensor.")


def module_summary(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{name: {algo, rank, alpha, shapes}} for inspection; LoRA modules also give down and up shapes. A
    LyCORIS module's rank is its dim as LyCORIS reads it (LoHa: w1_b's rows; LoKr: w1_a's or w2_a's columns,
    None when both Kronecker halves are full matrices)."""
    summary = {}
    for name, parts in group_modules(state).items():
        algo = module_algo(parts)
        if algo is None or (algo in ("lora", "dora") and any(key not in parts for key in LORA_KEYS)):
            continue
        rank = _module_rank(algo, parts)
        alpha = parts.get(ALPHA)
        entry = {"algo": algo, "rank": rank,
                 "alpha": float(alpha) if alpha is not None else float(rank or 1),
                 "shapes": {key: list(t.shape) for key, t in parts.items() if key != ALPHA}}
        if algo in ("lora", "dora"):  # DoRA: a LoRA plus its magnitude
            entry["down"], entry["up"] = entry["shapes"][LORA_DOWN], entry["shapes"][LORA_UP]
        summary[name] = entry
    return summary


def _module_rank(algo: str, parts: dict[str, torch.Tensor]) -> int | None:
    if algo in ("lora", "dora"):
        return int(parts[LORA_DOWN].shape[0])
    if algo == "loha":
        return int(parts[HADA_W1_B].shape[0]) if HADA_W1_B in parts else None
    if algo == "oft":  # the block size (LyCORIS's diag-oft dim)
        return int(parts[OFT_BLOCKS].shape[-1])
    inner = parts.get(LOKR_W1_A, parts.get(LOKR_W2_A))
    return int(inner.shape[1]) if inner is not None else None


def to_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
