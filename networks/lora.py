"""One LoRA/LoCon adapter around one Linear or Conv2d: y = base(x) + multiplier * (alpha / r) * up(down(x)).

The base module stays where it is in the model and keeps its own parameters; only its `forward` is
redirected here (kohya's way). So the model's state_dict never changes, a pipeline built on the same
UNet sees the adapter, and detaching restores the very same module object.
"""

from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("kaiming", "gaussian")


class LoraModule(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, init: str = "kaiming",
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.multiplier = 1.0
        self.enabled = True
        self.merged = False
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        # Held outside the module tree so the adapter's state_dict holds only its own weights.
        self.__dict__["base"] = base
        self.__dict__["base_forward"] = None
        self.lora_down, self.lora_up = _make_down_up(base, self.rank)
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "kaiming") -> None:
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # kohya's choice
        elif init == "gaussian":
            nn.init.normal_(self.lora_down.weight, std=1.0 / self.rank)
        else:
            raise ValueError(f"unknown init {init!r}")
        nn.init.zeros_(self.lora_up.weight)

    # -- hooking into the base module -------------------------------------------------------
    def hook(self) -> None:
        if self.base_forward is None:
            self.__dict__["base_forward"] = self.base.forward
            self.base.forward = self.forward

    def unhook(self) -> None:
        if self.base_forward is not None:
            del self.base.forward  # drops the instance attribute, the class's forward shows again
            self.__dict__["base_forward"] = None

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_forward(x, *args, **kwargs)
        if self.merged or not self.enabled or self.multiplier == 0:
            return out
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return out
        return out + self.delta_output(x).to(out.dtype)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.lora_down.weight.dtype
        h = x.to(weight_dtype)
        if self.training and self.dropout:  # no dropout kernel at all when p = 0
            h = nn.functional.dropout(h, self.dropout)
        h = self.lora_down(h)
        scale = self.multiplier * self.scale
        if self.training and self.rank_dropout:
            h = h * self._rank_mask(h)
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(h) * scale

    def _rank_mask(self, h: torch.Tensor) -> torch.Tensor:
        rank_dim = 1 if h.dim() == 4 else h.dim() - 1
        shape = [1] * h.dim()
        shape[0], shape[rank_dim] = h.shape[0], self.rank
        return (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)

    # -- weights -----------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """scale * up @ down in the base weight's shape, computed in fp32 (multiplier not applied)."""
        down = self.lora_down.weight.float()
        up = self.lora_up.weight.float()
        if down.dim() == 2:
            delta = up @ down
        else:
            delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        return delta * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._add_to_base(self.multiplier)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_to_base(-self.multiplier)
            self.merged = False

    def _add_to_base(self, factor: float) -> None:
        weight = self.base.weight
        delta = self.delta_weight().to(weight.device)
        weight.copy_((weight.float() + factor * delta).to(weight.dtype))


def _make_down_up(base: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """A: Linear [r, in] or a conv with the base conv's kernel/stride/padding; B: Linear [out, r] or 1x1 conv."""
    if isinstance(base, nn.Linear):
        return nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)
    if isinstance(base, nn.Conv2d):
        down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                         base.dilation, bias=False)
        return down, nn.Conv2d(rank, base.out_channels, 1, bias=False)
    raise TypeError(f"LoRA supports Linear and Conv2d, not {type(base).__name__}")
