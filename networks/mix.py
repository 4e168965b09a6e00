"""Several LoRAs (each with a weight) folded into one LoRA of a chosen rank.

The weighted sum of low-rank updates is itself a product: sum_i w_i s_i B_i A_i = [w_1 s_1 B_1 | ...] @
[A_1; ...], of rank sum(r_i). Its SVD goes through QR like any module's (networks.analysis), so mixing
never builds a full weight matrix, and with no rank given the result is exact. A module present in only
some of the files is mixed from those.
"""

from __future__ import annotations

import os

import torch

from .analysis import ModuleFactors, block_order, check_same_shape, factored_svd, lora_factors
from .errors import SdloraError
from .inspect import lora_family
from .lora_file import read_lora, save_lora
from .metadata import MINIMAL_KEYS
from .resize import RankChoice, Truncation, kohya_state, rank_metadata, truncation_report

Source = tuple[dict[str, torch.Tensor], float, str]  # (state dict, weight, name for messages)


def mix_states(sources: list[Source], choice: RankChoice,
               dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(kohya state dict, {module: report}) of sum_i weight_i * delta_i, truncated per `choice`."""
    choice.validate()
    if not sources:
        raise SdloraError("Give at least one LoRA file to mix.")
    factors = [(lora_factors(state, name, lycoris=False), weight, name) for state, weight, name in sources]
    names = sorted({n for f, _, _ in factors for n in f}, key=lambda n: (block_order(n), n))
    truncations, report = [], {}
    for name in names:
        present = [(f[name], weight, source) for f, weight, source in factors if name in f]
        truncation, report[name] = mix_module(name, present, choice, dtype)
        truncations.append(truncation)
    return kohya_state(truncations), report


def mix_module(name: str, present: list[tuple[ModuleFactors, float, str]], choice: RankChoice,
               dtype: torch.dtype | None) -> tuple[Truncation, dict]:
    first = present[0][0]
    for module, _, source in present[1:]:
        check_same_shape(first, module, present[0][2], source)
    up = torch.cat([module.up.double() * (weight * module.scale) for module, weight, _ in present], dim=1)
    down = torch.cat([module.down.double() for module, _, _ in present], dim=0)
    svd = factored_svd(up, down)
    k = choice.pick(svd.S, name, first.max_rank)
    # a 4-D layout wins over 2-D: some trainers store 1x1-conv modules flat, the model needs 4-D there
    kernel = next((m.kernel for m, _, _ in present if m.kernel is not None), None)
    report = truncation_report(name, svd.S, up.shape[1], k)
    report["sources"] = len(present)
    return Truncation(name, svd, k, kernel, dtype or first.dtype), report


def mix_loras(paths: list[str | os.PathLike], weights: list[float] | None, output: str | os.PathLike,
              choice: RankChoice, dtype: torch.dtype | None = None) -> dict[str, dict]:
    """Mix the files at `paths` (weights default to 1) into `output`; returns the per-module report."""
    weights = list(weights) if weights else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise SdloraError(f"Got {len(weights)} weight(s) for {len(paths)} LoRA file(s); give one weight per file.")
    loaded = [read_lora(path) for path in paths]
    families = {str(path): lora_family(state, meta) for path, (state, meta) in zip(paths, loaded)}
    known = {f for f in families.values() if f}
    if len(known) > 1:
        shown = ", ".join(f"{p} is {f}" for p, f in families.items() if f)
        raise SdloraError(f"The LoRAs were made for different model families ({shown}); mix files of one family.")
    sources = [(state, weight, str(path)) for (state, _), weight, path in zip(loaded, weights, paths)]
    state, report = mix_states(sources, choice, dtype)
    base_meta = {k: v for k, v in loaded[0][1].items() if k in MINIMAL_KEYS}
    base_meta["modelspec.title"] = "mix of " + ", ".join(os.path.basename(str(p)) for p in paths)
    note = f"mix {choice.describe()}: " + ", ".join(f"{os.path.basename(str(p))} x {w:g}" for p, w in zip(paths, weights))
    save_lora(output, state, rank_metadata(base_meta, state, note))
    return report
