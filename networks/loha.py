"""LyCORIS's LoHa: delta W = scale * (w1_a @ w1_b) * (w2_a @ w2_b), an elementwise (Hadamard) product of two
rank-r products, so rank up to r^2 from the parameters of a rank-2r LoRA.

The math, the initialisation and the file keys are LyCORIS's (`lycoris/modules/loha.py`): w1_a, w2_a are
[out, r], w1_b, w2_b [r, in * kh * kw] (a conv's kernel is flattened into the input side); w1 starts random,
w2_a at zero, so the adapter starts as a no-op. Tucker (`hada_t1`/`hada_t2`) is not offered.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import WeightDeltaAdapter
from .spec import NetworkSpec

# The file-key suffixes of one LoHa module, alpha aside (adapter.ALPHA).
HADA_W1_A, HADA_W1_B, HADA_W2_A, HADA_W2_B = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"
LOHA_KEYS = (HADA_W1_A, HADA_W1_B, HADA_W2_A, HADA_W2_B)


class LohaModule(WeightDeltaAdapter):
    kind, label, spec_types, file_keys = "loha", "LoHa", ("loha",), LOHA_KEYS
    network_module = "lycoris.kohya"  # as kohya's sd-scripts record LyCORIS networks

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, rslora: bool = False):
        super().__init__(base, rank, alpha, dropout, rank_dropout, module_dropout, rslora)
        out_dim, in_dim = base.weight.shape[0], base.weight[0].numel()
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, self.rank))
        self.hada_w1_b = nn.Parameter(torch.empty(self.rank, in_dim))
        self.hada_w2_a = nn.Parameter(torch.empty(out_dim, self.rank))
        self.hada_w2_b = nn.Parameter(torch.empty(self.rank, in_dim))
        # LyCORIS's init: w1 random, w2_a zero (so the product starts at zero)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)

    @classmethod
    def from_spec(cls, spec: NetworkSpec, base: nn.Module, rank: int, alpha: float) -> LohaModule:
        return cls(base, rank, alpha, spec.dropout, spec.rank_dropout, spec.module_dropout, rslora=spec.rslora)

    def weight_change(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (getattr(self, key) if dtype is None else getattr(self, key).to(dtype)
                              for key in LOHA_KEYS)
        return ((w1a @ w1b) * (w2a @ w2b) * self.scale).reshape(self.base.weight.shape)

    @torch.no_grad()
    def scale_change(self, factor: torch.Tensor) -> None:
        """Multiply the change by `factor` (max-norm), half of it on each product."""
        root = factor.sqrt()
        self.hada_w1_a.mul_(root.to(self.hada_w1_a.dtype))
        self.hada_w2_a.mul_(root.to(self.hada_w2_a.dtype))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        root = self.scale ** 0.5  # scale folded in, half on each product, so alpha = r loads the same everywhere
        tensors = {key: getattr(self, key).detach() for key in LOHA_KEYS}
        tensors["hada_w1_a"] = tensors["hada_w1_a"].float() * root
        tensors["hada_w2_a"] = tensors["hada_w2_a"].float() * root
        return tensors

    @classmethod
    @torch.no_grad()
    def from_file(cls, base: nn.Module, tensors: dict[str, torch.Tensor], alpha: float | None) -> LohaModule:
        """The module a file's tensors describe, read as LyCORIS reads it: rank = w1_b's rows, scale alpha / r."""
        rank = int(tensors["hada_w1_b"].shape[0])
        module = cls(base, rank, alpha if alpha is not None else rank)
        for key in LOHA_KEYS:
            target = getattr(module, key)
            rows = tensors[key].shape[0]
            if tensors[key].numel() != target.numel() or rows != target.shape[0]:
                raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}, not {tuple(target.shape)}")
            target.copy_(tensors[key].reshape(target.shape))
        return module


def hadamard_factors(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                     w2b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r1 r2], down [r1 r2, n]) with up @ down == (w1a @ w1b) * (w2a @ w2b) exactly: the
    Hadamard product of two products is one product of their row-wise / column-wise Khatri-Rao products.
    Lets the LoRA analysis (spectrum, resize to a LoRA) run on a LoHa without the full matrix."""
    up = (w1a[:, :, None] * w2a[:, None, :]).flatten(1)
    down = (w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)
    return up, down
