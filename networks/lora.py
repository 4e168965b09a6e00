"""One LoRA/LoCon adapter around one Linear or Conv2d: y = base(x) + multiplier * (alpha / r) * up(down(x)).

Hooking, forward, merge and unmerge are the shared ones of networks/adapter.py. Max-norm's ||B A||_F is taken
through the r x r Gram matrices, ||B A||_F^2 = trace((B^T B)(A A^T)), so the full out x in (x k x k) matrix
is never built: that is the one part written by hand here, no library has it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapter import Adapter, FileModule
from .errors import SdloraError
from .spec import NetworkSpec

# The file-key suffixes of one LoRA/LoCon module (`<name>.lora_down.weight`, ...; docs/LORA_FORMAT.md), alpha
# aside (adapter.ALPHA).
LORA_DOWN = "lora_down.weight"
LORA_UP = "lora_up.weight"
LORA_KEYS = (LORA_DOWN, LORA_UP)


class LoraModule(Adapter):
    kind, label, spec_types, file_keys = "lora", "LoRA", ("lora", "locon"), LORA_KEYS
    network_module = "networks.lora"  # kohya's networks.lora reads LoCon too (conv_dim)

    def __init__(self, base: nn.Module, rank: int, alpha: float, init: str = "kaiming",
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__(base, rank, alpha, dropout, rank_dropout, module_dropout, rslora)
        self.__dict__["original_weight"] = None  # a CPU copy, kept while an init has moved the base
        self.lora_down, self.lora_up = _make_down_up(base, self.rank)
        self.reset_parameters(init)

    @classmethod
    def from_spec(cls, spec: NetworkSpec, base: nn.Module, rank: int, alpha: float) -> LoraModule:
        return cls(base, rank, alpha, spec.init, spec.dropout, spec.rank_dropout, spec.module_dropout,
                   rslora=spec.rslora)

    @classmethod
    def read(cls, base: nn.Module, tensors: dict[str, torch.Tensor], alpha: float | None, name: str,
             source: str) -> LoraModule:
        down, up = tensors.get(LORA_DOWN), tensors.get(LORA_UP)
        if down is None or up is None:
            raise SdloraError(f"Module '{name}' in {source} lacks lora_down or lora_up weights; "
                              "only complete LoRA/LoCon, DoRA or LyCORIS LoHa/LoKr/OFT modules can be loaded.")
        rank = down.shape[0]
        adapter = cls(base, rank, alpha if alpha is not None else float(rank))
        adapter.load_factors(name, down, up, source)
        return adapter

    @torch.no_grad()
    def load_factors(self, name: str, down: torch.Tensor, up: torch.Tensor, source: str) -> None:
        for kind, layer, tensor in (("lora_down", self.lora_down, down), ("lora_up", self.lora_up, up)):
            expected = tuple(layer.weight.shape)
            if tensor.dim() == 2 and len(expected) == 4 and expected[2:] == (1, 1):
                tensor = tensor[:, :, None, None]  # some trainers store 1x1-conv LoRA as 2-D
            if tuple(tensor.shape) != expected:
                raise SdloraError(f"{source}: {name}.{kind}.weight has shape {tuple(tensor.shape)} but the model "
                                  f"needs {expected}; the file was made for a different base model.")
            layer.weight.copy_(tensor.to(layer.weight.dtype))

    def learning_rate_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"down": [self.lora_down.weight], "up": [self.lora_up.weight]}

    def export(self, exact: bool = True) -> FileModule:
        down, up, alpha, error = self.export_weights(exact)
        conv = down.dim() == 4 and down.shape[-1] > 1  # a 3x3 conv keeps its alpha: diffusers reads those right
        return FileModule({LORA_DOWN: down, LORA_UP: up}, alpha, "own" if conv else "common",
                          error if self.moved_base and not exact else None)

    def change_norm(self) -> torch.Tensor:
        """||scale * B A||_F through the Gram matrices, for linear and conv adapters alike."""
        up = self.lora_up.weight.detach().float().flatten(1)  # [out, r]
        down = self.lora_down.weight.detach().float().flatten(1)  # [r, in * k * k]
        gram = (up.T @ up) * (down @ down.T)  # elementwise: the trace of a product of symmetric matrices
        return gram.sum().clamp(min=0).sqrt() * abs(self.scale)

    @torch.no_grad()
    def scale_change(self, factor: torch.Tensor) -> None:
        """Multiply the change by `factor`, its square root on each of up and down."""
        root = factor.sqrt()
        self.lora_up.weight.mul_(root.to(self.lora_up.weight.dtype))
        self.lora_down.weight.mul_(root.to(self.lora_down.weight.dtype))

    def reset_parameters(self, init: str = "kaiming") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_down.weight, std=1.0 / self.rank)
        else:  # kohya's choice; also the placeholder until PiSSA / LoRA-GA replace it
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    # -- inits that move the base weight (PiSSA, LoRA-GA) --------------------------------------
    @property
    def moved_base(self) -> bool:
        return getattr(self, "init_down", None) is not None

    @torch.no_grad()
    def start_from(self, up0: torch.Tensor, down0: torch.Tensor) -> None:
        """Start at B0 A0 instead of 0 and take scale * B0 A0 out of the base weight, so the model's
        output is unchanged; B0/A0 are kept (saved with the state) to export the true change later."""
        self.lora_up.weight.copy_(up0.reshape(self.lora_up.weight.shape))
        self.lora_down.weight.copy_(down0.reshape(self.lora_down.weight.shape))
        self.register_buffer("init_up", self.lora_up.weight.detach().clone())
        self.register_buffer("init_down", self.lora_down.weight.detach().clone())
        if self.original_weight is None:
            self.__dict__["original_weight"] = self.base.weight.detach().to("cpu", copy=True)
        self.sync_base()

    @torch.no_grad()
    def sync_base(self) -> None:
        """base = original - scale * B0 A0 (again after a resume has loaded B0, A0)."""
        if self.moved_base:
            original = self.original_weight.to(self.base.weight.device, torch.float32)
            shift = self.scale * _product(self.init_up.float(), self.init_down.float())
            self.base.weight.copy_((original - shift).to(self.base.weight.dtype))

    @torch.no_grad()
    def restore_base(self) -> None:
        if self.original_weight is not None:
            self.base.weight.copy_(self.original_weight.to(self.base.weight.device))

    def export_weights(self, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(down, up, alpha, relative error) of the change this adapter makes to the *original* base.

        Plain adapters export as they are, alpha = scale * r (so rsLoRA loads right everywhere). After an
        init moved the base, the change is scale (B A - B0 A0): exact at rank 2r by stacking [A; A0] and
        [B, -B0], or re-ranked to r by SVD with the relative error reported."""
        down, up = self.lora_down.weight.detach(), self.lora_up.weight.detach()
        if not self.moved_base:
            return down, up, self.alpha * math.sqrt(self.rank) if self.rslora else self.alpha, 0.0
        if exact:
            down = torch.cat([down, self.init_down], 0)
            up = torch.cat([up, -self.init_up], 1)
            return down, up, self.scale * 2 * self.rank, 0.0
        delta = self.scale * (_product(up.float(), down.float()) - _product(self.init_up.float(),
                                                                            self.init_down.float()))
        flat = delta.flatten(1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        root = s[: self.rank].sqrt()
        new_up, new_down = u[:, : self.rank] * root, root[:, None] * vh[: self.rank]
        error = float((flat - new_up @ new_down).norm() / flat.norm().clamp_min(1e-12))
        return (new_down.reshape(down.shape), new_up.reshape(up.shape), float(self.rank), error)

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
        return _product(self.lora_up.weight.float(), self.lora_down.weight.float()) * self.scale


def _product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up @ down in the base weight's shape: [out, in] or, for convs, [out, in, kh, kw]."""
    if down.dim() == 2:
        return up @ down
    return torch.einsum("or,rikl->oikl", up.flatten(1), down)


def _make_down_up(base: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """A: Linear [r, in] or a conv with the base conv's kernel/stride/padding; B: Linear [out, r] or 1x1 conv."""
    if isinstance(base, nn.Linear):
        return nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)
    if isinstance(base, nn.Conv2d):
        down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                         base.dilation, bias=False)
        return down, nn.Conv2d(rank, base.out_channels, 1, bias=False)
    raise TypeError(f"LoRA supports Linear and Conv2d, not {type(base).__name__}")
