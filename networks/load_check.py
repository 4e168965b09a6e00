"""Does an exported LoRA file load, with nothing dropped, in A1111/Forge, ComfyUI and diffusers?

Checked against docs/LORA_FORMAT.md from the safetensors header alone (names, dtypes, shapes, metadata),
so even a multi-gigabyte file is checked without reading its tensors:
- structure (`check_lora_structure`, no model needed): only lora_down / lora_up / alpha keys, every module
  complete, alpha a 0-dim float32, up and down agreeing on the rank, tensors not sharing bytes, metadata
  values all strings, and the family's naming (SGM UNet names and lora_te1_/lora_te2_ for SDXL, diffusers
  UNet names and lora_te_ for SD1/SD2, exactly one `text_model_` in a text-encoder name);
- against the base model (`check_lora_file`): every name is the one loaders map onto a module of the model,
  and the shapes fit that module (Linear: down [r, in], up [out, r]; conv: down [r, in, kh, kw] with the
  module's kernel, up [out, r, 1, 1]).
LyCORIS LoHa/LoKr modules (networks/lycoris_keys.py) are checked the same way: complete, their factors
multiplying to the module's weight shape. A1111/Forge and ComfyUI load them; diffusers' load_lora_weights
does not, which the result says in `not_loaded_by`. A DoRA module is a LoRA module plus `dora_scale`, one value
per input column (or output row); diffusers drops the magnitude, so it is named there too.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .adapter import ALPHA
from .dora import DORA_SCALE
from .loha import LOHA_KEYS
from .lokr import LOKR_HALVES
from .lora import LORA_DOWN, LORA_UP
from .lycoris_keys import ALGO_NAMES, ALL_SUFFIXES, module_algo
from .naming import (
    DIFFUSERS_HEADS,
    FAMILY_PREFIXES,
    PREFIXES,
    SGM_HEADS,
    UNET_PREFIX,
    alias_names,
    components_for,
    kohya_name,
)
from .oft import OFT_BLOCKS, OFT_KEYS
from .spec import FAMILIES
from .targets import is_adaptable

WEIGHT_DTYPES = ("F16", "BF16", "F32")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit; a larger "header" means a foreign file


@dataclass
class LoadCheck:
    ok: bool
    problems: list[str] = field(default_factory=list)
    modules: int = 0
    not_loaded_by: list[str] = field(default_factory=list)  # loaders that skip the file by design (LoHa/LoKr)

    def event_fields(self, path: str, limit: int = 20) -> dict:
        """The `load_check` event's fields; a long problem list is cut (a renamed prefix breaks every key)."""
        shown = self.problems[:limit]
        if len(self.problems) > limit:
            shown.append(f"... and {len(self.problems) - limit} more problems")
        fields = {"ok": self.ok, "problems": shown, "path": path, "modules": self.modules}
        if self.not_loaded_by:
            fields["not_loaded_by"] = self.not_loaded_by
        return fields


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' spelling: F32, F16, BF16...
    shape: tuple[int, ...]
    offsets: tuple[int, int]


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """(tensors, raw metadata) straight from the safetensors header; ValueError for a foreign file."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError("the file is shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER:
            raise ValueError("the header length is implausible")
        header = json.loads(handle.read(size).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {key: TensorInfo(str(v["dtype"]), tuple(v["shape"]), tuple(v["data_offsets"]))
               for key, v in header.items()}
    return tensors, metadata


# -- structure, no model needed ----------------------------------------------------------------------
def check_lora_structure(path: str | os.PathLike, family: str | None = None) -> LoadCheck:
    """The model-free half of the check; `family` (sd1/sd2/sdxl) adds the per-family naming rules."""
    try:
        tensors, metadata = read_header(path)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        return LoadCheck(False, [f"{Path(path).name} is not a readable safetensors file ({error})."])
    modules, problems = _group_modules(tensors)
    problems += _metadata_problems(metadata) + _overlap_problems(tensors)
    if family is not None and family not in FAMILIES:
        problems.append(f"Unknown family '{family}'; use one of {', '.join(FAMILIES)}.")
        family = None
    for name, parts in sorted(modules.items()):
        problems += _module_problems(name, parts) + _name_problems(name, family)
    if not modules:
        problems.append("The file holds no LoRA module (no lora_down/lora_up/alpha keys).")
    lycoris = any(module_algo(parts) in ("loha", "lokr", "oft", "dora") for parts in modules.values())
    return LoadCheck(not problems, problems, len(modules), ["diffusers load_lora_weights"] if lycoris else [])


def _group_modules(tensors: dict[str, TensorInfo]) -> tuple[dict[str, dict[str, TensorInfo]], list[str]]:
    modules: dict[str, dict[str, TensorInfo]] = {}
    problems = []
    for key, info in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix not in ALL_SUFFIXES:
            problems.append(f"Key '{key}' is not lora_down/lora_up/alpha (nor a DoRA or LyCORIS LoHa/LoKr/OFT key); loaders "
                            "warn about or drop it.")
            continue
        modules.setdefault(name, {})[suffix] = info
    return modules, problems


def _module_problems(name: str, parts: dict[str, TensorInfo]) -> list[str]:
    algo = module_algo(parts)
    if algo in ("loha", "lokr", "oft"):
        return _lycoris_problems(name, algo, parts)
    missing = [s for s in (LORA_DOWN, LORA_UP, ALPHA) if s not in parts]
    if missing:
        return [f"Module '{name}' lacks {' and '.join(missing)}"
                + ("; a missing alpha silently means scale 1 in every loader." if missing == [ALPHA] else ".")]
    down, up, alpha = parts[LORA_DOWN], parts[LORA_UP], parts[ALPHA]
    problems = []
    if alpha.shape != () or alpha.dtype != "F32":
        problems.append(f"'{name}.{ALPHA}' is {alpha.dtype} with shape {list(alpha.shape)}; loaders expect a "
                        "0-dim float32.")
    for key, info in ((LORA_DOWN, down), (LORA_UP, up)):
        if info.dtype not in WEIGHT_DTYPES:
            problems.append(f"'{name}.{key}' is {info.dtype}; use fp16, bf16 or fp32.")
    if len(down.shape) not in (2, 4) or len(up.shape) != len(down.shape):
        problems.append(f"Module '{name}' has down {list(down.shape)} and up {list(up.shape)}; both must be "
                        "2-D (Linear) or both 4-D (conv).")
    elif up.shape[1] != down.shape[0]:
        problems.append(f"Module '{name}': up {list(up.shape)} does not take the rank {down.shape[0]} of "
                        f"down {list(down.shape)}.")
    elif len(up.shape) == 4 and up.shape[2:] != (1, 1):
        problems.append(f"Module '{name}': a conv lora_up must be 1x1, not {up.shape[2]}x{up.shape[3]}.")
    if algo == "dora" and not problems:
        problems += _magnitude_problems(name, parts[DORA_SCALE], down.shape[1], up.shape[0])
    return problems


def _magnitude_problems(name: str, magnitude: TensorInfo, in_dim: int, out_dim: int) -> list[str]:
    """A DoRA magnitude: float, one value per input column ([1, in(, 1, 1)], what sdlora writes) or per output
    row ([out, 1(, 1, 1)], LyCORIS's default), which is how ComfyUI tells the axes apart."""
    if magnitude.dtype not in WEIGHT_DTYPES:
        return [f"'{name}.{DORA_SCALE}' is {magnitude.dtype}; use fp16, bf16 or fp32."]
    shape, count = magnitude.shape, math.prod(magnitude.shape)
    if shape and ((shape[0] == 1 and count == in_dim) or (shape[0] == out_dim and count == out_dim)):
        return []
    return [f"'{name}.{DORA_SCALE}' has shape {list(shape)}, but its lora_down takes {in_dim} inputs and lora_up "
            f"gives {out_dim} outputs; DoRA loaders read [1, {in_dim}] (or [{out_dim}, 1])."]


def _lycoris_problems(name: str, algo: str, parts: dict[str, TensorInfo]) -> list[str]:
    """Complete, float weights, a 0-dim float32 alpha, factors that multiply."""
    label = ALGO_NAMES[algo]
    if algo in ("loha", "oft"):
        needed = [*(LOHA_KEYS if algo == "loha" else OFT_KEYS), ALPHA]
    else:  # per half the full matrix, or its factor a; then alpha; then the b of each factored half
        needed = [full if full in parts else a for full, a, _ in LOKR_HALVES] + [ALPHA]
        needed += [b for full, _, b in LOKR_HALVES if full not in parts]
    missing = [key for key in needed if key not in parts]
    if missing:
        return [f"{label} module '{name}' lacks {' and '.join(missing)}."]
    problems = []
    alpha = parts[ALPHA]
    if alpha.shape != () or alpha.dtype != "F32":
        problems.append(f"'{name}.{ALPHA}' is {alpha.dtype} with shape {list(alpha.shape)}; loaders expect a "
                        "0-dim float32.")
    problems += [f"'{name}.{key}' is {info.dtype}; use fp16, bf16 or fp32." for key, info in parts.items()
                 if key != ALPHA and info.dtype not in WEIGHT_DTYPES]
    if _lycoris_weight_shape(algo, parts) is None:
        shapes = ", ".join(f"{key} {list(info.shape)}" for key, info in sorted(parts.items()) if key != ALPHA)
        problems.append(f"{label} module '{name}' has factors that do not multiply ({shapes}).")
    return problems


def _lycoris_weight_shape(algo: str, parts: dict[str, TensorInfo]) -> tuple[int, int] | None:
    """(out, in * kh * kw) of the weight a LoHa/LoKr module's factors build, None when they do not fit."""
    shape = {key: info.shape for key, info in parts.items()}
    if algo == "oft":  # square blocks along the output rows; the input side is not the file's to say
        blocks = shape[OFT_BLOCKS]
        return (blocks[0] * blocks[1], None) if len(blocks) == 3 and blocks[1] == blocks[2] else None
    if algo == "loha":
        w1a, w1b, w2a, w2b = (flat(shape[k]) for k in LOHA_KEYS)
        if None in (w1a, w1b, w2a, w2b) or w1a[1] != w1b[0] or w2a[1] != w2b[0] or w1a[0] != w2a[0] \
                or w1b[1] != w2b[1]:
            return None
        return w1a[0], w1b[1]
    halves = []
    for full, a_key, b_key in LOKR_HALVES:
        if full in shape:
            halves.append(flat(shape[full]))
            continue
        a, b = flat(shape[a_key]), flat(shape[b_key])
        halves.append(None if a is None or b is None or a[1] != b[0] else (a[0], b[1]))
    if None in halves:
        return None
    return halves[0][0] * halves[1][0], halves[0][1] * halves[1][1]


def flat(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """A factor's shape as a matrix: (rows, everything else), None for a scalar or a vector."""
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else None


def _name_problems(name: str, family: str | None) -> list[str]:
    prefixes = FAMILY_PREFIXES.get(family, tuple(PREFIXES.values()))
    prefix = next((p for p in prefixes if name.startswith(p)), None)
    if prefix is None:
        where = f" for {family}" if family else ""
        return [f"Module '{name}' does not start with {', '.join(prefixes)}{where}; loaders skip it."]
    rest = name[len(prefix):]
    if prefix != UNET_PREFIX:
        if rest.count("text_model_") != 1:
            return [f"Text-encoder module '{name}' must contain 'text_model_' exactly once; A1111 and ComfyUI "
                    "ignore it otherwise."]
        return []
    if family == "sdxl" and rest.startswith(DIFFUSERS_HEADS):
        return [f"SDXL module '{name}' uses diffusers UNet names; SDXL files need the SGM names "
                "(input_blocks_, middle_block_, output_blocks_) that every loader maps."]
    if family in ("sd1", "sd2") and rest.startswith(SGM_HEADS):
        return [f"{family.upper()} module '{name}' uses SDXL's SGM UNet names; SD1/SD2 loaders read diffusers "
                "names (down_blocks_, mid_block_, up_blocks_)."]
    return []


def _metadata_problems(metadata) -> list[str]:
    if not isinstance(metadata, dict):
        return ["The header's __metadata__ is not a table of strings."]
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    return [f"Metadata '{k}' is a {type(metadata[k]).__name__}, not a string; loaders reject the header."
            for k in bad]


def _overlap_problems(tensors: dict[str, TensorInfo]) -> list[str]:
    spans = sorted((info.offsets, key) for key, info in tensors.items())
    return [f"Tensors '{a}' and '{b}' share bytes; every tensor must be stored on its own."
            for ((_, end_a), a), ((start_b, _), b) in zip(spans, spans[1:]) if start_b < end_a]


# -- against the base model --------------------------------------------------------------------------
def check_lora_file(path: str | os.PathLike, family: str, unet: nn.Module | None,
                    text_encoders: list[nn.Module]) -> LoadCheck:
    """The structure check plus: every module name maps to a module of this model, with fitting shapes."""
    result = check_lora_structure(path, family)
    if family not in FAMILIES or result.modules == 0:
        return result
    modules, _ = _group_modules(read_header(path)[0])
    canonical, aliases = _model_names(family, unet, text_encoders)
    problems = list(result.problems)
    for name, parts in sorted(modules.items()):
        module = canonical.get(name)
        if module is None:
            problems.append(_unknown_name(name, family, aliases))
            continue
        algo = module_algo(parts)
        if algo in ("loha", "lokr", "oft"):
            problems += _lycoris_shape_problems(name, algo, module, parts)
            continue
        problems += _shape_problems(name, module, parts.get(LORA_DOWN), parts.get(LORA_UP))
    return LoadCheck(not problems, problems, result.modules, result.not_loaded_by)


def _lycoris_shape_problems(name: str, algo: str, module: nn.Module, parts: dict[str, TensorInfo]) -> list[str]:
    built = _lycoris_weight_shape(algo, parts)
    want = (module.weight.shape[0], math.prod(module.weight.shape[1:]))
    if built is not None and built[1] is None:  # OFT: only the rows are the file's
        want = (want[0], None)
    if built is None or built == want:
        return []  # a mismatch inside the factors is already reported by the structure check
    return [f"{ALGO_NAMES[algo]} module '{name}' builds a {list(built)} weight but the model's "
            f"{type(module).__name__} is {list(module.weight.shape)}."]


def _model_names(family: str, unet, text_encoders) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """{loader name: module} for every Linear/Conv2d of the model, and {other spelling: loader name}."""
    canonical: dict[str, nn.Module] = {}
    aliases: dict[str, str] = {}
    for part in components_for(family, unet, text_encoders):
        for path, module in part.model.named_modules():
            if not is_adaptable(module):
                continue
            name = kohya_name(part, path)
            canonical[name] = module
            for alias in alias_names(part, path):
                aliases.setdefault(alias, name)
    return canonical, aliases


def _unknown_name(name: str, family: str, aliases: dict[str, str]) -> str:
    if name in aliases:
        return (f"Module '{name}' is spelt the way only some loaders read; A1111/Forge, ComfyUI and diffusers "
                f"all read '{aliases[name]}'.")
    return f"Module '{name}' matches no module of this {family} model; every loader drops it."


def _shape_problems(name: str, module: nn.Module, down: TensorInfo | None, up: TensorInfo | None) -> list[str]:
    if down is None or up is None:
        return []  # already reported by the structure check
    rank = down.shape[0] if down.shape else 0
    if isinstance(module, nn.Linear):
        want_down, want_up = (rank, module.in_features), (module.out_features, rank)
    else:
        want_down = (rank, module.in_channels, *module.kernel_size)
        want_up = (module.out_channels, rank, 1, 1)
    problems = []
    for key, got, want in ((LORA_DOWN, down.shape, want_down), (LORA_UP, up.shape, want_up)):
        if tuple(got) != tuple(want):
            problems.append(f"'{name}.{key}' has shape {list(got)} but the model's "
                            f"{type(module).__name__} needs {list(want)}.")
    return problems
