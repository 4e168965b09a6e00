"""A LoRA/LoCon from a fine-tuned model: the SVD of (tuned - base) per adaptable module, truncated.

The modules are those of the standard target table (networks.targets) and named by networks.naming, so
the result loads wherever a trained sdlora file does. Linear layers and 1x1 convs take `choice`; convs with a
larger kernel take `conv_choice` and the LoCon layout (k x k down conv, 1x1 up conv).
"""

from __future__ import annotations

import torch
from torch import nn

from .analysis import LowRankSVD
from .errors import SdloraError
from .naming import components_for, kohya_name
from .resize import RankChoice, Truncation, kohya_state, truncation_report
from .targets import TargetRules, find_targets, uses_conv_rank

ROLES = ("unet", "text_encoder", "text_encoder_2")


def extract_module(name: str, base_weight: torch.Tensor, tuned_weight: torch.Tensor, choice: RankChoice,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Truncation, dict]:
    """(truncated SVD, report) for one module; 4-D weights will give 4-D LoRA tensors with the base kernel."""
    if base_weight.shape != tuned_weight.shape:
        raise SdloraError(f"Module {name} is {tuple(base_weight.shape)} in the base model but "
                          f"{tuple(tuned_weight.shape)} in the tuned one; both must be the same architecture.")
    # float64 on the CPU for exactness; float32 on a GPU, where float64 is slow and the SVD is the whole cost
    work = torch.float64 if torch.device(device).type == "cpu" else torch.float32
    delta = (tuned_weight.to(device, work) - base_weight.to(device, work)).flatten(1)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    svd = LowRankSVD(u.cpu().double(), s.cpu().double(), vh.cpu().double())
    k = choice.pick(svd.S, name, min(delta.shape))
    kernel = tuple(base_weight.shape[2:]) if base_weight.dim() == 4 else None
    report = truncation_report(name, svd.S, min(delta.shape), k)
    report.pop("rank_before")
    return Truncation(name, svd, k, kernel, dtype), report


def changed(base_weight: torch.Tensor, tuned_weight: torch.Tensor, min_change: float) -> bool:
    """Whether the module moved by more than `min_change` relative to its norm (fp16 round-trips don't count)."""
    delta = (tuned_weight.double() - base_weight.double()).norm()
    return bool(delta > min_change * base_weight.double().norm())


def extract_lora(family: str, base: dict[str, nn.Module], tuned: dict[str, nn.Module], choice: RankChoice,
                 conv_choice: RankChoice | None = None, locon: bool = True, text_encoder: bool = True,
                 min_change: float = 1e-6, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(kohya state dict, {module: report}) of tuned - base; `base` / `tuned` map roles to models
    ("unet", "text_encoder", "text_encoder_2", as in a diffusers pipeline). Unchanged modules are left out."""
    choice.validate()
    conv_choice = (conv_choice or choice).validate()
    parts = components_for(family, base.get("unet"),
                           [base.get(r) for r in ROLES[1:] if base.get(r) is not None] if text_encoder else [])
    rules = TargetRules(locon=locon)
    truncations, report = [], {}
    for part in parts:
        tuned_modules = _tuned_modules(tuned, part.role)
        for path, module in find_targets(part.model, part.is_unet, rules):
            tuned_module = tuned_modules.get(path)
            if tuned_module is None or not hasattr(tuned_module, "weight"):
                raise SdloraError(f"The tuned model has no module {part.role}.{path}; extract from two models "
                                  "of the same architecture.")
            if not changed(module.weight, tuned_module.weight, min_change):
                continue
            name = kohya_name(part, path)
            rank_choice = conv_choice if uses_conv_rank(module) else choice
            truncation, report[name] = extract_module(name, module.weight.detach(), tuned_module.weight.detach(),
                                                      rank_choice, dtype, device)
            truncations.append(truncation)
    if not truncations:
        raise SdloraError("The tuned model equals the base model in every adaptable module; there is nothing "
                          "to extract (check that the two models differ).")
    return kohya_state(truncations), report


def _tuned_modules(tuned: dict[str, nn.Module], role: str) -> dict[str, nn.Module]:
    model = tuned.get(role)
    if model is None:
        raise SdloraError(f"The tuned model has no {role}; extract from two models of the same family.")
    return dict(model.named_modules())
