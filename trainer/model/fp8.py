"""Frozen base weights stored in float8 (kohya's --fp8_base, OneTrainer's fp8 weights).

`store_fp8` turns each plain nn.Linear / nn.Conv2d of a frozen module into an fp8-storing twin: the weight is
kept as float8_e4m3fn (1 byte a value instead of 2 or 4) and cast to the run's compute dtype inside the
layer's own forward, so each layer computes in the run's precision. Biases, norms and embeddings keep the
compute dtype. The twin is the same object with its class swapped to a subclass, so:
- the state_dict keys and the module tree do not change (the load check and export never see a difference);
- the adapters' kohya-style hook (networks/adapter.py replaces the base's `forward` with the adapter's and
  calls the one it saved) still runs the upcasting forward, and unhooking shows it again;
- gradient checkpointing and torch.compile see an ordinary forward (a pre-hook swapping weights would not
  survive a checkpoint's recompute as plainly).
Nothing in a training run merges an adapter into its base (previews compute through the hooked forward,
`sdlora lora merge` loads its own full-precision model); the config refuses the inits that move the base
weight (PiSSA, LoRA-GA), which would write into fp8 weights. A class swap rather than parametrize: a
parametrization renames the weight's state_dict key and makes `weight` a computed value that merging
would write into silently.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

FP8 = torch.float8_e4m3fn


class Fp8Linear(nn.Linear):
    """An nn.Linear whose weight is stored in fp8 and used in `compute_dtype`."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(self.compute_dtype)
        return functional.linear(x.to(weight.dtype), weight, _same(self.bias, weight.dtype))


class Fp8Conv2d(nn.Conv2d):
    """An nn.Conv2d whose weight is stored in fp8 and used in `compute_dtype`."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(self.compute_dtype)
        return self._conv_forward(x.to(weight.dtype), weight, _same(self.bias, weight.dtype))


# Exact classes only: a subclass of Linear/Conv2d may have a forward of its own that the twin would replace.
_TWINS = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}


def _same(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None else bias.to(dtype)


def store_fp8(module: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store every Linear / Conv2d weight of the frozen `module` in float8_e4m3fn, each layer computing in
    `compute_dtype`; returns how many layers changed. Call it after the module's last dtype cast (a later
    `.to(dtype)` would cast the fp8 weights back) and only on modules nothing trains: the weights stop
    requiring gradients. Works on any device, the meta device included (memory traces)."""
    changed = 0
    for layer in module.modules():
        twin = _TWINS.get(type(layer))
        if twin is None:
            if isinstance(layer, (Fp8Linear, Fp8Conv2d)):
                layer.compute_dtype = compute_dtype
            continue
        with torch.no_grad():
            # .data keeps the Parameter object (anything holding it stays valid) while its storage shrinks
            layer.weight.data = layer.weight.data.to(FP8)
        layer.weight.requires_grad_(False)
        layer.__class__ = twin
        layer.compute_dtype = compute_dtype
        changed += 1
    return changed


def fp8_layers(module: nn.Module) -> list[nn.Module]:
    """The layers of `module` whose weights are stored in fp8 (for reports and tests)."""
    return [layer for layer in module.modules() if isinstance(layer, (Fp8Linear, Fp8Conv2d))]
