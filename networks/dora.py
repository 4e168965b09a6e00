"""DoRA (Liu et al. 2024, weight-decomposed LoRA): a LoRA/LoCon whose merged weight is renormalised per column
and rescaled by a learned magnitude, W' = dora_scale * (W + scale * up @ down) / ||W + scale * up @ down||.

The file is a LoRA module (`lora_down`, `lora_up`, `alpha`) plus `dora_scale`. Its magnitude is stored per
INPUT column, [1, in] (conv [1, in, 1, 1]): the one convention A1111/Forge (which knows only this axis),
ComfyUI/Forge (its input-axis branch takes the norm of W + dW, as training does) and OneTrainer read alike,
and LyCORIS's LoConModule with wd_on_out=False (its network arg `wd_on_output=False`, which the file's
ss_network_args records). Files with the magnitude per OUTPUT row, [out, 1(, 1, 1)] (LyCORIS's and kohya's
default, told apart as ComfyUI does: dora_scale.shape[0] == out) are read and computed on that axis with
LyCORIS's math, and written back on it. The magnitude starts at the base weight's own norms, so a fresh
adapter is a no-op.

Forward: a per-column magnitude is a per-input-channel scale s = dora_scale / ||W + dW|| of x, so
W' x = (W + dW)(s * x): the base module's own forward (linear or conv with its stride and padding, an fp8
base upcasting in its own forward) and the LoRA path both run on s * x, and the full weight is only built
without gradients for its norm (per output row: s scales the output instead). The norm is detached, as
the paper (sec. 4.3) and peft do: it still follows dW at every step but takes no gradient, which saves the
backward through a full out x in matrix per module; the forward value, and so the file, is the same.

A multiplier m merges as A1111 and ComfyUI do, W + m (W' - W) (LyCORIS differs at m != 1). DoRA's change is
not additive in its factors, so merging keeps the original weight and unmerging puts it back exactly.
Max-norm caps the direction's update scale * up @ down and leaves the magnitude alone, as LyCORIS's
apply_max_norm does.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .adapter import FileModule
from .errors import SdloraError
from .lora import LORA_DOWN, LORA_UP, LoraModule

# The file-key suffix of DoRA's magnitude (LyCORIS's, ComfyUI's and A1111's name); with the LoRA keys and alpha
# it is one DoRA module.
DORA_SCALE = "dora_scale"
DORA_KEYS = (LORA_DOWN, LORA_UP, DORA_SCALE)
EPS = torch.finfo(torch.float32).eps  # added to every norm, as ComfyUI and LyCORIS do (a zero column stays zero)


def column_norms(weight: torch.Tensor, on_output: bool = False) -> torch.Tensor:
    """The fp32 L2 norms of `weight` per input column, [1, in(, 1, 1)], or per output row, [out, 1(, 1, 1)]:
    dora_scale's shape on each axis."""
    flat = weight.float()
    dims = tuple(range(1, flat.dim())) if on_output else (0, *range(2, flat.dim()))
    return torch.linalg.vector_norm(flat, dim=dims, keepdim=True)


def _full_precision(device: torch.device):
    """No autocast while a norm is taken: a half-precision up @ down would shift the magnitude's divisor."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _channels(values: torch.Tensor, like: torch.Tensor, conv: bool) -> torch.Tensor:
    """Per-channel values shaped to broadcast over `like`: channel dim 1 of a conv's [N, C, H, W], the last
    dim of a linear's [..., C]."""
    values = values.reshape(-1).to(like.dtype)
    return values.view(1, -1, 1, 1) if conv else values


class DoraModule(LoraModule):
    kind, label, spec_types, file_keys = "dora", "DoRA", ("dora",), DORA_KEYS
    network_module = "lycoris.kohya"  # as kohya's sd-scripts record a LyCORIS network (algo lora, dora_wd)
    keeps_original = True  # W + m (W' - W) in, the very original weight back out

    def __init__(self, base: nn.Module, rank: int, alpha: float, init: str = "kaiming",
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 rslora: bool = False, on_output: bool = False):
        super().__init__(base, rank, alpha, init, dropout, rank_dropout, module_dropout, rslora)
        self.on_output = bool(on_output)
        with torch.no_grad():
            self.dora_scale = nn.Parameter(column_norms(base.weight.detach(), self.on_output))

    @classmethod
    def owns(cls, suffixes) -> bool:
        return DORA_SCALE in suffixes  # a LoRA module with a magnitude; the table asks DoRA before LoRA

    @classmethod
    def read(cls, base: nn.Module, tensors: dict[str, torch.Tensor], alpha: float | None, name: str,
             source: str) -> DoraModule:
        adapter = super().read(base, tensors, alpha, name, source)  # the LoRA half, its sentences
        adapter.load_magnitude(name, tensors[DORA_SCALE], source)
        return adapter

    @torch.no_grad()
    def load_magnitude(self, name: str, magnitude: torch.Tensor, source: str) -> None:
        """Take a file's dora_scale on whichever axis it is (ComfyUI's rule: shape[0] == out is the output axis)."""
        out_dim, in_dim = self.base.weight.shape[:2]
        on_output = magnitude.dim() > 0 and magnitude.shape[0] == out_dim and out_dim != 1
        want = out_dim if on_output else in_dim
        if magnitude.numel() != want:
            raise SdloraError(f"{source}: {name}.{DORA_SCALE} has shape {tuple(magnitude.shape)} but the model "
                              f"needs [1, {in_dim}] (or [{out_dim}, 1]); the file was made for a different base model.")
        self.on_output = on_output
        rest = [1] * (self.base.weight.dim() - 2)
        shape = (out_dim, 1, *rest) if on_output else (1, in_dim, *rest)
        self.dora_scale = nn.Parameter(magnitude.detach().to(self.dora_scale.device, torch.float32).reshape(shape))

    def learning_rate_groups(self) -> dict[str, list[nn.Parameter]]:
        # The magnitude starts at the base weight's norms (about 1), not at zero as lora_up does, so LoRA+'s
        # raised rate (for the zero-started B side) would throw it around: it learns at the base rate.
        return {"down": [self.lora_down.weight, self.dora_scale], "up": [self.lora_up.weight]}

    def network_args(self) -> dict[str, str]:
        # as kohya's sd-scripts record a LyCORIS DoRA; wd_on_output says the axis (LyCORIS's default is True)
        return {"algo": "lora", "dora_wd": "True", "wd_on_output": str(self.on_output)}

    def export(self, exact: bool = True) -> FileModule:
        down, up, alpha, _ = self.export_weights(exact)
        # Its own alpha, never the file's common one: folding an alpha into the factors (FileModule.at_alpha)
        # would scale dora_scale too, and diffusers (what the common alpha is for) does not read DoRA at all.
        return FileModule({LORA_DOWN: down, LORA_UP: up, DORA_SCALE: self.dora_scale.detach()}, alpha, "own")

    # -- the decomposed weight ---------------------------------------------------------------------
    def direction_change(self) -> torch.Tensor:
        """scale * up @ down in the base weight's shape, fp32: the LoRA half of the change."""
        return LoraModule.delta_weight(self)

    @torch.no_grad()
    def merged_norms(self) -> torch.Tensor:
        """||W + scale * up @ down|| per column (or row), fp32, + eps; taken without gradients (see above)."""
        with _full_precision(self.dora_scale.device):
            weight = self.base.weight.float() + self.direction_change().to(self.base.weight.device)
            return column_norms(weight, self.on_output) + EPS

    def delta_weight(self) -> torch.Tensor:
        """W' - W in fp32 (multiplier not applied): the whole change a merge at multiplier 1 makes."""
        with torch.no_grad(), _full_precision(self.dora_scale.device):
            weight = self.base.weight.float()
            merged = weight + self.direction_change().to(weight.device)
            ratio = self.dora_scale.float().to(weight.device) / (column_norms(merged, self.on_output) + EPS)
            return merged * ratio - weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged or not self.enabled or self.multiplier == 0 or (
                self.training and self.module_dropout and torch.rand(()) < self.module_dropout):
            return self.base_forward(x, *args, **kwargs)
        ratio = self.dora_scale / self.merged_norms().to(self.dora_scale.device)  # grad through the magnitude only
        conv = isinstance(self.base, nn.Conv2d)
        m = self.multiplier
        if self.on_output:  # W' x + b = s (W x + dW x) + b; at m: base + m (s - 1) W x + s m dW x
            out = self.base_forward(x, *args, **kwargs)
            s = _channels(ratio, out, conv)
            bias = self.base.bias
            plain = out if bias is None else out - _channels(bias, out, conv)
            return out + m * (s - 1) * plain + s * self.delta_output(x).to(out.dtype)
        scaled = x * _channels(ratio, x, conv)  # W' x = (W + dW)(s x); delta_output carries m already
        if m == 1:
            out = self.base_forward(scaled, *args, **kwargs)
            return out + self.delta_output(scaled).to(out.dtype)
        out = self.base_forward(x, *args, **kwargs)
        moved = self.base_forward(scaled, *args, **kwargs) - out  # W (s x - x): the bias cancels
        return out + m * moved + self.delta_output(scaled).to(out.dtype)
