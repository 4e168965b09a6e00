"""kohya's block-wise settings, with UNet blocks numbered as kohya and A1111 number them, so presets
written for kohya_ss mean the same here: learning-rate multipliers (down_lr_weight / mid_lr_weight /
up_lr_weight; a block at weight 0 gets no adapter at all) and ranks and alphas per block (block_dims /
block_alphas, conv_block_dims / conv_block_alphas; rank 0 = no adapter).

SD1/SD2: 25 entries, IN00-IN11 (down), MID, OUT00-OUT11 (up). SDXL: 23 entries, the time embedding, IN00-IN08,
MID0-MID2, OUT00-OUT08, the output conv. Text-encoder modules always keep weight 1.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .errors import SdloraError
from .naming import UNET_PREFIX

# diffusers-style SD1/SD2 names: down_blocks_1_attentions_0_..., up_blocks_2_upsamplers_0_...
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
BLOCKS = {False: 12, True: 9}  # down (= up) blocks of SD1/SD2 and of SDXL
MID_BLOCKS = {False: 1, True: 3}
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def block_index(name: str, sdxl: bool) -> int | None:
    """The kohya block a UNet adapter belongs to (its index into `block_weights`); None outside the UNet."""
    if not name.startswith(UNET_PREFIX):
        return None
    rest = name[len(UNET_PREFIX):]
    if sdxl:
        for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
            if rest.startswith(prefix):
                return first + int(rest[len(prefix):].split("_")[0])
        return 22 if rest.startswith("out_") else 0  # the output conv, or the time / label embeddings
    match = _UPDOWN.search(rest)
    if match:
        side, block, kind, number = match.groups()
        inner = 3 * int(block) + (2 if kind.endswith("samplers") else int(number))
        return 1 + inner if side == "down" else BLOCKS[False] + 1 + inner
    return BLOCKS[False] if rest.startswith("mid_block_") else None  # conv_in / time embedding: no block


def parse_weights(value: str | Sequence[float] | None, length: int, key: str) -> list[float] | None:
    """kohya's syntax: numbers ("0,0,0.5,1") padded with 1 to `length` (a longer list is cut), or a preset
    name with an optional offset ("sine", "cosine+.5", "linear", "reverse_linear", "zeros")."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        name, _, offset = value.strip().partition("+")
        if name in PRESETS and length < 2:
            raise SdloraError(f"{key} takes numbers, not the curve {name!r} (it has one block per entry); "
                              "write e.g. 0.5.")
        if name in PRESETS:
            try:
                return _preset(name, length, float(offset) if offset else 0.0)
            except ValueError:
                raise SdloraError(f"{key} {value!r} has an offset that is not a number; write e.g. sine+0.5.") \
                    from None
        parts = value.split(",")
    else:
        parts = list(value)
    try:
        weights = [float(part) if str(part).strip() else 0.0 for part in parts]  # kohya: an empty entry is 0
    except (TypeError, ValueError):
        raise SdloraError(f"{key} {value!r} is neither numbers separated by commas nor one of "
                          f"{', '.join(PRESETS)}; write e.g. 0,0,0,1,1,1 or sine.") from None
    if any(w < 0 for w in weights):
        raise SdloraError(f"{key} {value!r} has a negative weight; use 0 or more.")
    return (weights + [1.0] * length)[:length]


def block_weights(sdxl: bool, down=None, mid=None, up=None, zero_threshold: float = 0.0) -> list[float] | None:
    """The multiplier of every block (kohya's list), or None when no weight is set. Weights at or below
    `zero_threshold` become 0."""
    lists = [parse_weights(value, length, key) for value, length, key in (
        (down, BLOCKS[sdxl], "network.down_lr_weight"), (mid, MID_BLOCKS[sdxl], "network.mid_lr_weight"),
        (up, BLOCKS[sdxl], "network.up_lr_weight"))]
    if all(weights is None for weights in lists):
        return None
    lengths = (BLOCKS[sdxl], MID_BLOCKS[sdxl], BLOCKS[sdxl])
    down_w, mid_w, up_w = ([w if w > zero_threshold else 0.0 for w in weights] if weights is not None else
                           [1.0] * n for weights, n in zip(lists, lengths))
    return [1.0, *down_w, *mid_w, *up_w, 1.0] if sdxl else [*down_w, *mid_w, *up_w]


def _preset(name: str, length: int, offset: float) -> list[float]:
    steps = range(length)
    if name == "zeros":
        return [offset] * length
    if name in ("sine", "cosine"):
        curve = [math.sin(math.pi * (i / (length - 1)) / 2) for i in steps]
    else:
        curve = [i / (length - 1) for i in steps]
    if name in ("cosine", "reverse_linear"):
        curve.reverse()
    return [w + offset for w in curve]


def block_count(sdxl: bool) -> int:
    """Entries of a per-block list: 25 for SD1/SD2, 23 for SDXL (with its embedding and output entries)."""
    return 2 * BLOCKS[sdxl] + MID_BLOCKS[sdxl] + (2 if sdxl else 0)


def parse_block_values(value: str | Sequence[float] | None, key: str, sdxl: bool | None = None,
                       whole: bool = False) -> list[float] | None:
    """A per-block list ("4,4,8,..."): one entry per block, 25 (SD1/SD2) or 23 (SDXL); `sdxl` None accepts
    either count (the family is not known yet). `whole`: ranks, so whole numbers."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        values = [float(part) for part in parts]
    except (TypeError, ValueError):
        raise SdloraError(f"{key} {value!r} is not numbers separated by commas; write one per block, e.g. "
                          "4,4,4,8,... (25 for SD1/SD2, 23 for SDXL).") from None
    if any(v < 0 or (whole and not v.is_integer()) for v in values):
        kind = "whole numbers of 0 or more" if whole else "numbers of 0 or more"
        raise SdloraError(f"{key} {value!r} must hold {kind}.")
    counts = (block_count(sdxl),) if sdxl is not None else (block_count(False), block_count(True))
    if len(values) not in counts:
        wanted = f"{counts[0]} for this {'SDXL' if sdxl else 'SD1/SD2'} UNet" if sdxl is not None \
            else "25 for SD1/SD2 or 23 for SDXL"
        raise SdloraError(f"{key} has {len(values)} entries but needs one per block: {wanted}.")
    return [int(v) for v in values] if whole else values
