"""`sdlora lora inspect FILE`: what a LoRA file holds, as a dict (for --json and the UI) and as text.

Metadata, the model family it was made for, modules per block, rank/alpha per module and the update's
norm ||scale * up @ down||_F per module and per block (computed through QR, never the full matrix).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import torch

from .adapter import ALPHA
from .analysis import block_of, block_order, lora_factors, module_svd, split_analysable
from .lora import LORA_DOWN
from .lora_file import module_summary, read_lora
from .lycoris_keys import group_modules, module_algo, split_key
from .naming import SGM_HEADS, TE1_PREFIX, TE2_PREFIX, UNET_PREFIX, role_of
from .oft import OFT_BLOCKS, oft_report

# ss_base_model_version / modelspec.architecture prefixes -> family
_VERSION_FAMILIES = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("stable-diffusion-xl", "sdxl"),
                     ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))
SGM_UNET = tuple(UNET_PREFIX + head for head in SGM_HEADS[:3])  # input, middle and output blocks
# kohya names of the UNet's 3x3 convs: diffusers' (SD1/SD2) and SGM's (SDXL) spellings
CONV_NAME = re.compile(r"_(conv1|conv2|in_layers_2|out_layers_3|op|conv|conv_in|conv_out|input_blocks_0_0|out_2)$")
LONG_VALUE = 160  # metadata values longer than this (tag frequencies, dataset dirs) are cut in the text view


def lora_family(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str | None:
    """"sd1", "sd2" or "sdxl" from the header, else from key names and shapes; None when nothing tells."""
    metadata = metadata or {}
    for key in ("ss_base_model_version", "modelspec.architecture"):
        value = metadata.get(key, "")
        for prefix, family in _VERSION_FAMILIES:
            if value.startswith(prefix):
                return family
    if metadata.get("ss_v2") == "True":
        return "sd2"
    if any(k.startswith((TE1_PREFIX, TE2_PREFIX, *SGM_UNET)) for k in state):
        return "sdxl"
    return _family_from_shapes(state)


def _family_from_shapes(state: dict[str, torch.Tensor]) -> str | None:
    # cross-attention reads the text encoder's width: 768 for SD1's CLIP-L, 1024 for SD2's OpenCLIP-H
    for key, tensor in state.items():
        if key.endswith(f"attn2_to_k.{LORA_DOWN}") and tensor.dim() >= 2 and tensor.shape[1] in (768, 1024):
            return "sd1" if tensor.shape[1] == 768 else "sd2"
    # SD1's proj_in / proj_out are 1x1 convs (4-D LoRA tensors), SD2's are Linear (2-D)
    for key, tensor in state.items():
        if key.endswith((f"proj_in.{LORA_DOWN}", f"proj_out.{LORA_DOWN}")):
            return "sd1" if tensor.dim() == 4 else "sd2"
    return None


def inspect_state(state: dict[str, torch.Tensor], metadata: dict[str, str], source: str = "the file") -> dict:
    """LoRA/LoCon and LyCORIS LoHa/LoKr files alike; a LyCORIS module's rank is its dim (LoKr with both
    halves full: None) and its norm that of its exact update. Modules that cannot be analysed (NaN, rank 0,
    a weight that is not a matrix) are named in "left_out", one sentence each, and the rest reported."""
    full_state = state
    state, left_out = split_analysable(full_state, source)
    rotations = {name: parts for name, parts in group_modules(state).items() if module_algo(parts) == "oft"}
    factors = lora_factors({k: v for k, v in state.items() if split_key(k)[0] not in rotations}, source)
    summary = module_summary(state)
    modules = {}
    for name in sorted([*factors, *rotations], key=lambda n: (block_order(n), n)):
        if name in rotations:
            modules[name] = _oft_module(name, rotations[name], summary[name])
            continue
        module, info = factors[name], summary[name]
        if module.algo in ("lora", "dora"):
            conv = module.kernel is not None and module.kernel != (1, 1)
        else:  # LyCORIS stores most conv factors flattened to 2-D, so the name tells
            conv = bool(CONV_NAME.search(name))
        modules[name] = {"block": block_of(name), "kind": "conv" if conv else "linear", "algo": module.algo,
                         "rank": info["rank"], "alpha": info["alpha"], "scale": module.scale,
                         "down": info.get("down"), "up": info.get("up"), "shapes": info["shapes"],
                         "norm": float(module_svd(module).S.norm())}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for k, t in full_state.items()
                     if not k.endswith(f".{ALPHA}")})
    algos = {m["algo"] for m in modules.values()}
    kind = "locon" if any(m["kind"] == "conv" for m in modules.values()) else "lora"
    return {"family": lora_family(full_state, metadata),
            "type": "+".join(sorted(algos - {"lora"})) if algos - {"lora"} else kind,
            "dtype": ", ".join(dtypes), "module_count": len(modules),
            "components": dict(Counter(role_of(name) for name in modules)),
            "rank_alpha": _rank_alpha_groups(modules), "blocks": _blocks(modules),
            "metadata": dict(sorted(metadata.items())), "modules": modules, "left_out": left_out}


def _oft_module(name: str, parts: dict[str, torch.Tensor], info: dict) -> dict:
    """An OFT module's row: its change depends on the base weight, so "norm" is ||Q||_F (the rotation's size)."""
    facts = oft_report(parts[OFT_BLOCKS], info["alpha"])
    return {"block": block_of(name), "kind": "conv" if CONV_NAME.search(name) else "linear", "algo": "oft",
            "rank": info["rank"], "alpha": info["alpha"], "scale": 1.0, "down": None, "up": None,
            "shapes": info["shapes"], "norm": facts["q_norm"], **facts}


def inspect_lora(path: str | os.PathLike) -> dict:
    """The report of the file at `path` (see inspect_state), with its path and size."""
    state, metadata = read_lora(path)
    report = inspect_state(state, metadata, str(path))
    return {"file": str(path), "size_bytes": Path(path).stat().st_size, **report}


def _rank_alpha_groups(modules: dict[str, dict]) -> list[dict]:
    counts = Counter((m["kind"], m["rank"], m["alpha"]) for m in modules.values())
    return [{"kind": kind, "rank": rank, "alpha": alpha, "modules": n}
            for (kind, rank, alpha), n in sorted(counts.items(), key=lambda item: _rank_key(item[0][1:]))]


def _blocks(modules: dict[str, dict]) -> dict[str, dict]:
    blocks: dict[str, dict] = {}
    for report in modules.values():
        row = blocks.setdefault(report["block"], {"modules": 0, "ranks": set(), "alphas": set(), "norm2": 0.0})
        row["modules"] += 1
        row["ranks"].add(report["rank"])
        row["alphas"].add(report["alpha"])
        row["norm2"] += report["norm"] ** 2
    return {block: {"modules": row["modules"], "ranks": sorted(row["ranks"], key=_rank_key), "alphas": sorted(row["alphas"]),
                    "norm": row["norm2"] ** 0.5} for block, row in blocks.items()}


# -- text ----------------------------------------------------------------------------------------
def render_inspect(report: dict, per_module: bool = False) -> str:
    """A terminal-friendly rendering of an inspect report."""
    lines = [f"file: {report['file']} ({report['size_bytes'] / 1e6:.2f} MB)"] if "file" in report else []
    components = ", ".join(f"{k} {v}" for k, v in report["components"].items())
    lines += [f"family: {report['family'] or 'unknown'}",
              f"type: {report['type']}, {report['module_count']} modules ({components}), dtype {report['dtype']}",
              "rank / alpha: " + "; ".join(f"{g['kind']} {_rank(g['rank'])}/{_num(g['alpha'])} x{g['modules']}"
                                           for g in report["rank_alpha"])]
    lines += ["", f"{'block':<26}{'modules':>8}{'rank':>10}{'alpha':>10}{'|dW|_F':>12}"]
    for block, row in report["blocks"].items():
        lines.append(f"{block:<26}{row['modules']:>8}{_set(row['ranks']):>10}{_set(row['alphas']):>10}"
                     f"{row['norm']:>12.4g}")
    rotations = [m for m in report["modules"].values() if m["algo"] == "oft"]
    if rotations:
        lines += [f"OFT: {len(rotations)} modules rotate their weight's rows in blocks of "
                  f"{_set(sorted({m['block_size'] for m in rotations}))}, largest angle "
                  f"{max(m['angle_degrees'] for m in rotations):.3g} deg; their |dW|_F column is ||Q||_F (the "
                  "change depends on the base weight), and spectra do not apply to a rotation."]
    magnitudes = sum(1 for m in report["modules"].values() if m["algo"] == "dora")
    if magnitudes:
        lines.append(f"DoRA: {magnitudes} modules also hold a learned magnitude (dora_scale) per column; their |dW|_F "
                     "column is the direction's update scale * up @ down, without it.")
    if report.get("left_out"):
        lines += ["", f"{len(report['left_out'])} module(s) left out of this report:"]
        lines += [f"  {sentence}" for sentence in report["left_out"].values()]
    if per_module:
        lines += ["", f"{'module':<72}{'rank':>6}{'alpha':>8}{'|dW|_F':>12}"]
        for name, m in report["modules"].items():
            lines.append(f"{name:<72}{_rank(m['rank']):>6}{_num(m['alpha']):>8}{m['norm']:>12.4g}")
    if report["metadata"]:
        lines += ["", "metadata:"]
        for key, value in report["metadata"].items():
            shown = value if len(value) <= LONG_VALUE else value[:LONG_VALUE] + f"... ({len(value)} chars)"
            lines.append(f"  {key}: {shown}")
    return "\n".join(lines)


def _rank_key(value):
    """Sort key where a full-matrix LoKr's rank None sorts last."""
    if isinstance(value, tuple):
        return tuple(_rank_key(v) for v in value)
    return (value is None, value or 0)


def _rank(value: int | None) -> str:
    return "full" if value is None else str(value)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _set(values: list) -> str:
    return ",".join(_rank(v) if v is None else _num(v) for v in values)
