"""One part of an original-layout checkpoint (the UNet, the VAE, the text encoders) read in the dtype it will
be used in, tensor by tensor, so that loading a model never holds the whole file and a converted copy at
once (issue 23: an fp16 SDXL file of 6.9 GB peaked at 21 GB of RAM when it was read whole and cast after).

A .safetensors file is read with plain file reads rather than safetensors' safe_open: safe_open maps the
file, and every page it touched counts in the process's resident memory until the handle closes, so reading
the UNet through it shows up as file + copy again. Each tensor is read into its own buffer and, when its
dtype differs, converted right away (the raw bytes are freed before the next tensor). A .ckpt (pickle) has no
index to read from, so it is loaded whole (with torch.load's mmap where the zip format allows it).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

# Where each part's weights live in an original (LDM / SGM) checkpoint.
PART_PREFIXES = {
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.",),
    "text_encoders": ("cond_stage_model.", "conditioner.embedders."),
}
# safetensors' dtype names (its format spec) -> torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_CHUNK = 1 << 30  # a single read() of 2 GB or more returns short on Linux


def part_keys(keys: Iterable[str], part: str) -> list[str]:
    return [key for key in keys if key.startswith(PART_PREFIXES[part])]


def in_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating tensors in `dtype` (None: as stored); integer ones (CLIP's position ids) as they are."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def read_safetensors_part(path: Path, keys: Iterable[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The tensors `keys` of a .safetensors file (already checked readable by safetensors) in `dtype`."""
    with path.open("rb", buffering=0) as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
        start = 8 + size
        out = {}
        for key in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):  # in file order: sequential reads
            info = header[key]
            begin, end = info["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(start + begin)
            _read_into(handle, memoryview(raw.numpy()))
            out[key] = in_dtype(raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"]), dtype)
    return out


def _read_into(handle, view: memoryview) -> None:
    done = 0
    while done < len(view):
        count = handle.readinto(view[done:done + _CHUNK])
        if not count:
            raise OSError(f"the file ends {len(view) - done} bytes early")
        done += count


def take_part(state: dict[str, torch.Tensor], keys: Iterable[str], dtype: torch.dtype | None) -> dict:
    """A loaded state dict's `keys`, moved out of it (so its memory goes once the part is built) in `dtype`."""
    return {key: in_dtype(state.pop(key), dtype) for key in list(keys)}
