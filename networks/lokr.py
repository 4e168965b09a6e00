"""LyCORIS's LoKr: delta W = scale * kron(w1, w2), a Kronecker product of a small matrix and a (low-rank) one.

The weight [out, in] is split as out = a * b, in = c * d by LyCORIS's `factorization` rule; w1 is [a, c]
(or w1_a @ w1_b with decompose_both), w2 is [b, d * kh * kw] as w2_a [b, r] @ w2_b [r, d * kh * kw], or the
full w2 [b, d(, kh, kw)] when r >= max(b, d) / 2. With both halves full there is no rank and the scale is 1
(LyCORIS's rule, and ComfyUI's). The math, init and file keys are LyCORIS's (`lycoris/modules/lokr.py`);
Tucker (`lokr_t2`) is not offered.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapter import WeightDeltaAdapter
from .spec import NetworkSpec

# The file-key suffixes of one LoKr module, alpha aside (adapter.ALPHA): each half is full or a product a @ b.
LOKR_W1, LOKR_W1_A, LOKR_W1_B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"
LOKR_W2, LOKR_W2_A, LOKR_W2_B = "lokr_w2", "lokr_w2_a", "lokr_w2_b"
LOKR_HALVES = ((LOKR_W1, LOKR_W1_A, LOKR_W1_B), (LOKR_W2, LOKR_W2_A, LOKR_W2_B))  # (full, a, b) per half
LOKR_KEYS = tuple(key for half in LOKR_HALVES for key in half)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of `dimension` into (m, n), m <= n, m * n = dimension: m = `factor` when it divides
    the dimension, else the most balanced pair with m <= factor (-1: no bound), e.g. 128 -> (8, 16) and
    with factor 4 -> (4, 32). Written out here (ten lines) because lycoris-lora is a test-only dependency;
    tests/test_lycoris_types.py checks it against LyCORIS's own."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LokrModule(WeightDeltaAdapter):
    kind, label, spec_types, file_keys = "lokr", "LoKr", ("lokr",), LOKR_KEYS
    network_module = "lycoris.kohya"  # as kohya's sd-scripts record LyCORIS networks

    def __init__(self, base: nn.Module, rank: int, alpha: float, factor: int = -1, decompose_both: bool = False,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__(base, rank, alpha, dropout, rank_dropout, module_dropout, rslora)
        out_dim, in_dim, *kernel = base.weight.shape
        a, b = factorization(out_dim, factor)
        c, d = factorization(in_dim, factor)
        self.factor, self.kernel = int(factor), tuple(kernel)
        if decompose_both and self.rank < max(a, c) / 2:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, self.rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(self.rank, c))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        if self.rank < max(b, d) / 2:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, self.rank))
            self.lokr_w2_b = nn.Parameter(torch.empty(self.rank, d * math.prod(kernel)))
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel))
        if self.full_halves:
            self.scale = 1.0  # no rank to scale by: LyCORIS's and ComfyUI's rule
        # LyCORIS's init: everything kaiming-uniform but the last factor of w2, which starts at zero
        for key in self.keys:
            if key in ("lokr_w2", "lokr_w2_b"):
                nn.init.zeros_(getattr(self, key))
            else:
                nn.init.kaiming_uniform_(getattr(self, key), a=math.sqrt(5))

    @classmethod
    def from_spec(cls, spec: NetworkSpec, base: nn.Module, rank: int, alpha: float) -> LokrModule:
        return cls(base, rank, alpha, spec.factor, spec.decompose_both, spec.dropout, spec.rank_dropout,
                   spec.module_dropout, rslora=spec.rslora)

    def network_args(self) -> dict[str, str]:
        return {**super().network_args(), "factor": str(self.factor)}

    @property
    def keys(self) -> list[str]:
        return [key for key in LOKR_KEYS if hasattr(self, key)]

    @property
    def full_halves(self) -> bool:
        return hasattr(self, "lokr_w1") and hasattr(self, "lokr_w2")

    def halves(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1 [a, c], w2 [b, d * kh * kw]), rebuilt from their factors where they have them."""
        get = (lambda key: getattr(self, key)) if dtype is None else (lambda key: getattr(self, key).to(dtype))
        w1 = get("lokr_w1") if hasattr(self, "lokr_w1") else get("lokr_w1_a") @ get("lokr_w1_b")
        w2 = get("lokr_w2").flatten(1) if hasattr(self, "lokr_w2") else get("lokr_w2_a") @ get("lokr_w2_b")
        return w1, w2

    def weight_change(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w1, w2 = self.halves(dtype)
        # kron of [a, c] and [b, d*k*k] lays out [a*b, c*d*k*k] exactly as the weight [out, in, kh, kw] flattens
        return (torch.kron(w1, w2) * self.scale).reshape(self.base.weight.shape)

    @torch.no_grad()
    def scale_change(self, factor: torch.Tensor) -> None:
        """Multiply the change by `factor` (max-norm), half of it on each Kronecker half."""
        root = factor.sqrt()
        for key in ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"):
            if hasattr(self, key):
                getattr(self, key).mul_(root.to(getattr(self, key).dtype))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {key: getattr(self, key).detach() for key in self.keys}
        root = self.scale ** 0.5  # folded in, half on each half, so alpha = r loads the same everywhere
        first = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
        second = "lokr_w2" if "lokr_w2" in tensors else "lokr_w2_a"
        tensors[first], tensors[second] = tensors[first].float() * root, tensors[second].float() * root
        return tensors

    @classmethod
    @torch.no_grad()
    def from_file(cls, base: nn.Module, tensors: dict[str, torch.Tensor], alpha: float | None) -> LokrModule:
        """The module a file's tensors describe (any factor or decompose_both), with LyCORIS's reading: the
        rank is w1_a's or w2_a's second side; alpha / rank is the scale, 1 when both halves are full."""
        factors = tensors.get("lokr_w1_a", tensors.get("lokr_w2_a"))
        rank = int(factors.shape[1]) if factors is not None else 1
        module = cls(base, rank, alpha if alpha is not None else rank)
        for key in module.keys:
            delattr(module, key)
        for key in LOKR_KEYS:
            if key in tensors:
                setattr(module, key, nn.Parameter(tensors[key].to(base.weight.device, torch.float32).clone()))
        module.alpha = float(alpha) if alpha is not None else float(rank)
        module.scale = 1.0 if module.full_halves else module.alpha / rank
        w1, w2 = module.halves()
        if torch.kron(w1, w2).numel() != base.weight.numel() or w1.shape[0] * w2.shape[0] != base.weight.shape[0]:
            raise ValueError(f"kron of {tuple(w1.shape)} and {tuple(w2.shape)} is not the weight's "
                             f"{tuple(base.weight.shape)}")
        return module


def kron_factors(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down == kron(w1, w2) exactly (kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2)),
    each half split on its shorter side, so the LoRA analysis runs on a LoKr without the full matrix."""
    def split(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = w.shape
        eye = torch.eye(min(rows, cols), dtype=w.dtype, device=w.device)
        return (eye, w) if rows <= cols else (w, eye)

    (u1, v1), (u2, v2) = split(w1), split(w2)
    return torch.kron(u1, u2), torch.kron(v1, v2)
