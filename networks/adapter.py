"""What every adapter type shares: hooking into the base module, the forward, merge and unmerge.

The base module stays where it is in the model and keeps its own parameters; only its `forward` is
redirected here (kohya's way). So the model's state_dict never changes, a pipeline built on the same
UNet sees the adapter, and detaching restores the very same module object. A subclass says what it adds
to the output (`delta_output`) and to the weight (`delta_weight`); LoRA/LoCon in lora.py, LyCORIS's
LoHa and LoKr in loha.py and lokr.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from .spec import scale_for

ALPHA = "alpha"  # every adapter type's file-key suffix for its alpha (`<name>.alpha`, a 0-dim float32)


class Adapter(nn.Module, ABC):
    kind = "adapter"  # "lora", "loha", "lokr": the file layout export writes

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha)
        self.rslora = rslora
        self.scale = scale_for(self.alpha, self.rank, rslora)
        self.multiplier = 1.0
        self.enabled = True
        self.merged = False
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        # Held outside the module tree so the adapter's state_dict holds only its own weights.
        self.__dict__["base"] = base
        self.__dict__["base_forward"] = None

    moved_base = False  # only a LoRA init (PiSSA, LoRA-GA) moves the base weight

    def sync_base(self) -> None:
        """Re-derive a base weight an init moved (LoRA only)."""

    def restore_base(self) -> None:
        """Put back a base weight an init moved (LoRA only)."""

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

    @abstractmethod
    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the base module's output for input x (multiplier applied)."""

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The change to the base weight, in its shape, in fp32 (multiplier not applied)."""

    # -- merging -----------------------------------------------------------------------------
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


class WeightDeltaAdapter(Adapter):
    """An adapter whose change is a whole weight matrix built from factors (LoHa, LoKr): the output runs the
    base module's own op (linear or conv, with its stride and padding) on that matrix, as LyCORIS does."""

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_change()
        h = x.to(weight.dtype)
        if self.training and self.dropout:
            h = nn.functional.dropout(h, self.dropout)
        weight = weight * self.multiplier
        if self.training and self.rank_dropout:  # LyCORIS's rank dropout for LoHa/LoKr: whole output rows
            keep = (torch.rand(weight.shape[0], device=weight.device) > self.rank_dropout).to(weight.dtype)
            weight = weight * keep.view(-1, *[1] * (weight.dim() - 1)) / (1.0 - self.rank_dropout)
        if isinstance(self.base, nn.Conv2d):
            base = self.base
            return nn.functional.conv2d(h, weight, None, base.stride, base.padding, base.dilation, base.groups)
        return nn.functional.linear(h, weight)

    @abstractmethod
    def weight_change(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """scale x the factors' product in the base weight's shape, its factors cast to `dtype` (None: as
        they are, with autograd, for training)."""

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self.weight_change(torch.float32)

    @abstractmethod
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """{suffix: tensor} of LyCORIS's layout for this module, the scale folded in and alpha = rank."""
