"""Change a LoRA's rank by truncating each module's SVD: to a fixed rank, or per module by energy / sv ratio.

The truncated update U_k S_k V_k^T is written back as up = U_k sqrt(S_k / c), down = sqrt(S_k / c) V_k^T
with c = alpha / k the loaders' scale, so both factors have the same magnitude (fp16-safe). The whole file
gets one alpha, the most common new rank (scale 1 for most modules): diffusers 0.42 drops per-module
alphas of attention and text-encoder modules that differ from the file's most common alpha (its
alpha_pattern keys match nothing), so a file with varying ranks must not vary its alphas.
Extract and mix end in the same step, so the rank choice and the writing live here.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass

import torch

from .adapter import ALPHA
from .analysis import LowRankSVD, ModuleFactors, block_of, energy_rank, lora_factors, module_svd
from .errors import SdloraError
from .lora import LORA_DOWN, LORA_UP
from .lora_file import read_lora, save_lora


@dataclass(frozen=True)
class RankChoice:
    """How many singular directions to keep per module.

    rank alone: exactly that many (fewer only where the update has fewer). energy / sv_ratio: per module,
    the fewest directions holding `energy` of the squared singular values / every direction with
    s >= s_max / sv_ratio; a rank given with them caps the result.
    """

    rank: int | None = None
    energy: float | None = None
    sv_ratio: float | None = None

    def validate(self) -> RankChoice:
        if self.energy is not None and self.sv_ratio is not None:
            raise SdloraError("Choose either an energy fraction or an sv ratio for a dynamic rank, not both.")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise SdloraError(f"The rank must be an integer >= 1 (got {self.rank}).")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise SdloraError(f"The energy fraction must be in (0, 1] (got {self.energy}); 0.9 keeps 90%.")
        if self.sv_ratio is not None and not self.sv_ratio >= 1:
            raise SdloraError(f"The sv ratio must be >= 1 (got {self.sv_ratio}); 10 keeps s >= s_max / 10.")
        return self

    @property
    def dynamic(self) -> bool:
        return self.energy is not None or self.sv_ratio is not None

    def describe(self) -> str:
        if self.energy is not None:
            return f"energy {self.energy}" + (f", rank <= {self.rank}" if self.rank else "")
        if self.sv_ratio is not None:
            return f"sv_ratio {self.sv_ratio}" + (f", rank <= {self.rank}" if self.rank else "")
        return f"rank {self.rank}" if self.rank else "lossless"

    def pick(self, singular_values: torch.Tensor, name: str, max_rank: int) -> int:
        """The rank for one module; at least 1 so every module stays in the file."""
        if self.rank is not None and not self.dynamic and self.rank > max_rank:
            raise SdloraError(f"rank {self.rank} exceeds module {name}'s maximum {max_rank}; "
                              f"choose a rank <= {max_rank} or a dynamic rank.")
        s = singular_values
        nonzero = int((s > s[0] * 1e-7).sum()) if len(s) and s[0] > 0 else 0
        if self.energy is not None:
            k = energy_rank(s, self.energy)
        elif self.sv_ratio is not None:
            k = int((s >= s[0] / self.sv_ratio).sum()) if nonzero else 0
        else:
            k = self.rank if self.rank is not None else nonzero
        if self.dynamic and self.rank is not None:
            k = min(k, self.rank)
        return max(1, min(k, len(s)))


@dataclass
class Truncation:
    """One module's SVD and the rank to keep, before the file's common alpha is known."""

    name: str
    svd: LowRankSVD
    rank: int
    kernel: tuple[int, ...] | None  # (kh, kw): write 4-D (conv) tensors
    dtype: torch.dtype


def kohya_state(truncations: list[Truncation]) -> dict[str, torch.Tensor]:
    """The kohya state dict of every truncation, all with one alpha: the most common rank (ties: the larger)."""
    counts = Counter(t.rank for t in truncations)
    alpha = float(max(counts, key=lambda rank: (counts[rank], rank))) if counts else 1.0
    state = {}
    for t in truncations:
        state.update(kohya_tensors(t.name, t.svd, t.rank, t.kernel, t.dtype, alpha))
    return state


def kohya_tensors(name: str, svd: LowRankSVD, k: int, kernel: tuple[int, ...] | None,
                  dtype: torch.dtype, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The three kohya tensors of the rank-k truncation; alpha None means alpha = k (scale 1).

    kernel=(kh, kw) writes the LoCon layout: down [k, in, kh, kw] (the base conv's kernel), up [out, k, 1, 1].
    """
    alpha = float(k) if alpha is None else alpha
    root = (svd.S[:k].clamp(min=0) * (k / alpha)).sqrt()  # divides out the scale alpha / k loaders apply
    up = svd.U[:, :k] * root
    down = root[:, None] * svd.Vh[:k]
    if kernel is not None:
        down = down.reshape(k, -1, *kernel)
        up = up[:, :, None, None]
    return {f"{name}.{LORA_DOWN}": down.to(dtype).contiguous(),
            f"{name}.{LORA_UP}": up.to(dtype).contiguous(),
            f"{name}.{ALPHA}": torch.tensor(alpha, dtype=torch.float32)}


def truncation_report(name: str, singular_values: torch.Tensor, rank_before: int, k: int) -> dict:
    """Rank change and how much of the update survives: kept energy and relative Frobenius error."""
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    kept = float(energy[:k].sum()) / total if total > 0 else 1.0
    return {"block": block_of(name), "rank_before": rank_before, "rank_after": k, "energy_kept": kept,
            "relative_error": math.sqrt(max(0.0, 1.0 - kept))}


def resize_module(module: ModuleFactors, choice: RankChoice, dtype: torch.dtype | None = None) -> tuple[Truncation, dict]:
    svd = module_svd(module)
    k = choice.pick(svd.S, module.name, module.max_rank)
    truncation = Truncation(module.name, svd, k, module.kernel, dtype or module.dtype)
    return truncation, truncation_report(module.name, svd.S, module.rank, k)


def resize_state(state: dict[str, torch.Tensor], choice: RankChoice, source: str = "the file",
                 dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(new kohya state dict, {module: report}); dtype None keeps each module's dtype."""
    choice.validate()
    truncations, report = [], {}
    for name, module in lora_factors(state, source, lycoris=False).items():
        truncation, report[name] = resize_module(module, choice, dtype)
        truncations.append(truncation)
    return kohya_state(truncations), report


def resize_lora(path: str | os.PathLike, output: str | os.PathLike, choice: RankChoice,
                dtype: torch.dtype | None = None) -> dict[str, dict]:
    """Resize the file at `path` into `output`, keeping its metadata (with the new ranks); returns the report."""
    state, metadata = read_lora(path)
    new_state, report = resize_state(state, choice, str(path), dtype)
    save_lora(output, new_state, rank_metadata(metadata, new_state, f"resize {choice.describe()}"))
    return report


def rank_metadata(metadata: dict[str, str], state: dict[str, torch.Tensor], note: str) -> dict[str, str]:
    """`metadata` with ss_network_dim/alpha/args describing `state`; "Dynamic" (kohya's word) when ranks vary."""
    linear, conv = set(), set()
    for key, tensor in state.items():
        if key.endswith(f".{LORA_DOWN}"):
            alpha = float(state[key.replace(f".{LORA_DOWN}", f".{ALPHA}")])
            is_conv = tensor.dim() == 4 and tuple(tensor.shape[2:]) != (1, 1)
            (conv if is_conv else linear).add((tensor.shape[0], alpha))
    out = dict(metadata)
    if linear:
        out["ss_network_dim"], out["ss_network_alpha"] = _dim_alpha(linear)
    args = _json_dict(out.get("ss_network_args"))
    if conv:
        args["conv_dim"], args["conv_alpha"] = _dim_alpha(conv)
    else:
        args.pop("conv_dim", None)
        args.pop("conv_alpha", None)
    out["ss_network_args"] = json.dumps(args)
    out.setdefault("ss_network_module", "networks.lora")
    out["sdlora_derived"] = note
    return out


def _dim_alpha(pairs: set[tuple[int, float]]) -> tuple[str, str]:
    ranks, alphas = {rank for rank, _ in pairs}, {alpha for _, alpha in pairs}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    alpha = alphas.pop() if len(alphas) == 1 else None
    return dim, "Dynamic" if alpha is None else str(int(alpha)) if float(alpha).is_integer() else repr(alpha)


def _json_dict(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
