"""What every adapter type shares: hooking into the base module, the forward, merge and unmerge; and what
each type must say about itself, so that the network (network.py) and the file code never ask which type
they hold.

The base module stays where it is in the model and keeps its own parameters; only its `forward` is
redirected here (kohya's way). So the model's state_dict never changes, a pipeline built on the same
UNet sees the adapter, and detaching restores the very same module object. A subclass says what it adds
to the output (`delta_output`) and to the weight (`delta_weight`), how it is built from a spec
(`from_spec`), which file keys are its own (`file_keys`) and how it reads itself from them (`read`), how
its parameters split for learning rates (`learning_rate_groups`), how it is written (`export`) and scaled
back by max-norm (`change_norm`, `scale_change`). LoRA/LoCon in lora.py, LyCORIS's LoHa and LoKr in
loha.py and lokr.py; the table of types in adapter_types.py.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import SdloraError
from .spec import NetworkSpec, scale_for

ALPHA = "alpha"  # every adapter type's file-key suffix for its alpha (`<name>.alpha`, a 0-dim float32)

# How a module's alpha is written: "common", the file's most common alpha with the module's own scale
# folded into its two factors (linear LoRA); "own", as it is (3x3-conv LoRA); "rank", alpha = r with the
# scale folded into the factors (LoHa, LoKr). network.py's kohya_state_dict says why.
AlphaRule = Literal["common", "own", "rank"]


@dataclass
class FileModule:
    """One adapter as a file stores it: {suffix: tensor} (alpha aside), its alpha and how that is written."""

    tensors: dict[str, torch.Tensor]
    alpha: float
    alpha_rule: AlphaRule
    error: float | None = None  # relative distance from the true change, when the export re-ranked it

    def at_alpha(self, common: float) -> FileModule:
        """The same change written at alpha `common`, for a product of two factors: each is multiplied by
        sqrt(alpha / common), so common / r * (factor^2 up down) == alpha / r * up down."""
        factor = math.sqrt(self.alpha / common)
        return FileModule({key: tensor.float() * factor for key, tensor in self.tensors.items()}, common,
                          self.alpha_rule, self.error)


class Adapter(nn.Module, ABC):
    kind = "adapter"  # "lora", "loha", "lokr": the file layout export writes (LyCORIS's "algo")
    label = "adapter"  # how sentences name the type: "LoRA", "LoHa", "LoKr"
    spec_types: tuple[str, ...] = ()  # the network.type values this class builds
    file_keys: tuple[str, ...] = ()  # its file-key suffixes, alpha aside (the keys that say a module is this type)
    network_module = ""  # what kohya's ss_network_module says for a file of this type

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
        self.__dict__["unmerged_weight"] = None  # the original weight while merged, when keeps_original

    # -- what each type says about itself ------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_spec(cls, spec: NetworkSpec, base: nn.Module, rank: int, alpha: float) -> Adapter:
        """A fresh adapter of this type around `base`, with the spec's options."""

    @classmethod
    def owns(cls, suffixes) -> bool:
        """Whether a file module holding these key suffixes is one of this type."""
        return any(suffix in cls.file_keys for suffix in suffixes)

    @classmethod
    @abstractmethod
    def read(cls, base: nn.Module, tensors: dict[str, torch.Tensor], alpha: float | None, name: str,
             source: str) -> Adapter:
        """The adapter one module `name` of a file describes; a module that does not fit `base` is one
        SdloraError naming it and `source`."""

    def learning_rate_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"down": [...], "up": [...]}: LoRA+ raises only "up"'s rate; a type without a B side puts all in
        "down" (as LyCORIS does)."""
        return {"down": list(self.parameters()), "up": []}

    @abstractmethod
    def export(self, exact: bool = True) -> FileModule:
        """This adapter as the file stores it: the change to the original base model."""

    def network_args(self) -> dict[str, str]:
        """What kohya's ss_network_args records for this type, the conv dims aside."""
        return {}

    def change_norm(self) -> torch.Tensor:
        """||delta W||_F in fp32, a 0-dim tensor (max-norm)."""
        return self.delta_weight().norm()

    @abstractmethod
    def scale_change(self, factor: torch.Tensor) -> None:
        """Multiply the change by `factor` (a 0-dim tensor; max-norm), spread over the factors."""

    moved_base = False  # only a LoRA init (PiSSA, LoRA-GA) moves the base weight
    # A change that is not a sum of its factors (DoRA's renormalised columns, OFT's rotation) cannot be taken
    # back out of the merged weight exactly: merge keeps the original weight (on the CPU), unmerge puts it back.
    keeps_original = False

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
            if self.keeps_original:
                self.__dict__["unmerged_weight"] = self.base.weight.detach().to("cpu", copy=True)
            self._add_to_base(self.multiplier)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            if self.unmerged_weight is not None:
                self.base.weight.copy_(self.unmerged_weight.to(self.base.weight.device))
                self.__dict__["unmerged_weight"] = None
            else:
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

    def network_args(self) -> dict[str, str]:
        return {"algo": self.kind}  # as kohya's sd-scripts record LyCORIS's network_args

    def export(self, exact: bool = True) -> FileModule:
        # the scale folded in and alpha = r, so every loader reads it alike (network.kohya_state_dict says why)
        return FileModule(self.file_tensors(), float(self.rank), "rank")

    @classmethod
    @abstractmethod
    def from_file(cls, base: nn.Module, tensors: dict[str, torch.Tensor], alpha: float | None) -> Adapter:
        """The module a file's tensors describe; KeyError / ValueError / RuntimeError when they do not fit."""

    @classmethod
    def read(cls, base: nn.Module, tensors: dict[str, torch.Tensor], alpha: float | None, name: str,
             source: str) -> Adapter:
        try:
            return cls.from_file(base, tensors, alpha)
        except (KeyError, ValueError, RuntimeError) as error:
            raise SdloraError(f"{source}: {cls.kind} module {name} does not fit the model's "
                              f"{tuple(base.weight.shape)} weight ({error}); the file was made for a "
                              "different base model or is incomplete.") from None
