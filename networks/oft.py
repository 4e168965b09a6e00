"""LyCORIS's diag-OFT (orthogonal fine-tuning, Qiu et al. 2023): each weight's output rows are rotated block by
block, W' = R^T W with R = diag(R_1 .. R_k), so the angles between neurons and every row block's norm stay.

Each block's rotation is the Cayley transform of a skew-symmetric Q = B - B^T of the trained `oft_blocks` B
[k, b, b]: R = (I + Q)(I - Q)^-1. B starts at zero, so R = I and the adapter starts as a no-op. The block
size b is `network.rank` read as LyCORIS reads its diag-oft `dim`: out = b * k by LyCORIS's factorization
(networks/lokr.py), which takes the smaller side as the block size (b = 32 on a 320-wide layer gives 32
blocks of 10) and, when b does not divide the layer's width, the most balanced split with blocks <= b.

COFT's constraint (`network.alpha` for oft, unset: none) bounds ||Q||_F to alpha x out as LyCORIS and A1111
read a file's alpha; ComfyUI reads alpha as the bound itself. The export therefore folds the bound into the
written blocks and writes alpha = 0, which every loader reads as "no constraint", so all compute one R.
The math, orientation (einsum "k n m, k n ... -> k m ...") and keys are LyCORIS's (`lycoris/modules/
diag_oft.py`), checked against it in tests/test_oft.py. BOFT (butterfly OFT, 4-D oft_blocks) is not offered.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import FileModule, WeightDeltaAdapter
from .lokr import factorization
from .spec import NetworkSpec

OFT_BLOCKS = "oft_blocks"  # the file-key suffix of one OFT module, alpha aside (adapter.ALPHA)
OFT_KEYS = (OFT_BLOCKS,)
NORM_EPS = 1e-8  # LyCORIS's and ComfyUI's guard in ||Q|| + eps


def skew(blocks: torch.Tensor) -> torch.Tensor:
    """Q = B - B^T per block: the generator every loader builds from the file's oft_blocks."""
    return blocks - blocks.transpose(-1, -2)


def bounded(q: torch.Tensor, constraint: float) -> torch.Tensor:
    """Q scaled down to ||Q||_F = constraint when it is longer (COFT; 0: no bound), as LyCORIS computes it;
    a clamp rather than LyCORIS's `if`, so no step waits on the GPU for the norm (x 1.0 leaves Q as it is)."""
    if constraint > 0:
        return q * (constraint / (q.norm() + NORM_EPS)).clamp(max=1.0)
    return q


def cayley(q: torch.Tensor) -> torch.Tensor:
    """R = (I + Q)(I - Q)^-1 per block, in fp32 (the inverse needs it), orthogonal for a skew-symmetric Q."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=torch.float32)
    q = q.float()
    return (eye + q) @ torch.linalg.inv(eye - q)


def rotate_rows(rotation: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """R^T applied to each block of `weight`'s output rows (LyCORIS's and ComfyUI's einsum)."""
    blocks, size, _ = rotation.shape
    rest = weight.shape[1:]
    return torch.einsum("k n m, k n ... -> k m ...", rotation, weight.reshape(blocks, size, *rest)).reshape(weight.shape)


class OftModule(WeightDeltaAdapter):
    kind, label, spec_types, file_keys = "oft", "OFT", ("oft",), OFT_KEYS
    network_module = "lycoris.kohya"  # as kohya's sd-scripts record LyCORIS networks
    algo = "diag-oft"  # LyCORIS's name, as ss_network_args records it
    keeps_original = True  # the change is a product: merge keeps the original weight, unmerge puts it back

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, block_size: int | None = None):
        super().__init__(base, rank, alpha, dropout, rank_dropout, module_dropout)
        out_dim = base.weight.shape[0]
        size = block_size or factorization(out_dim, self.rank)[0]
        self.rank, self.scale = int(size), 1.0  # the block size is the "dim" files and sentences report
        self.constraint = self.alpha * out_dim if self.alpha > 0 else 0.0  # LyCORIS's reading of alpha
        self.oft_blocks = nn.Parameter(torch.zeros(out_dim // size, size, size))

    @classmethod
    def from_spec(cls, spec: NetworkSpec, base: nn.Module, rank: int, alpha: float) -> OftModule:
        # network.alpha is COFT's one bound for every module (convs too, as LyCORIS's one `constraint`), only
        # when set outright: alpha_ratio x rank has no meaning for a rotation
        constraint = spec.alpha if spec.alpha is not None else 0.0
        return cls(base, rank, constraint, spec.dropout, spec.rank_dropout, spec.module_dropout)

    def network_args(self) -> dict[str, str]:
        return {"algo": self.algo}  # the bound is folded into the file's blocks (alpha written 0)

    def generator(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Q as the run computes it: the trained blocks' skew part, bounded by the constraint."""
        blocks = self.oft_blocks if dtype is None else self.oft_blocks.to(dtype)
        return bounded(skew(blocks), self.constraint)

    def rotation(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """R [k, b, b]: each block's rotation."""
        return cayley(self.generator(dtype))

    def weight_change(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        # (R^T - I) W: the rotation's change to the original weight (fp8 storage read in the adapter's dtype)
        rotation = self.rotation(dtype)
        eye = torch.eye(self.rank, device=rotation.device, dtype=rotation.dtype)
        weight = self.base_weight().to(rotation.device, rotation.dtype)
        return rotate_rows(rotation - eye, weight)

    def base_weight(self) -> torch.Tensor:
        """The weight the rotation applies to: the original one, also while merged."""
        return (self.unmerged_weight if self.unmerged_weight is not None else self.base.weight).detach()

    def change_norm(self) -> torch.Tensor:
        """||Q||_F in fp32 for max-norm: the rotation's size (its angles are 2 atan of Q's eigenvalues),
        independent of the weight's own norm, and exactly proportional to the blocks' scale, as COFT bounds it."""
        return self.generator(torch.float32).norm()

    @torch.no_grad()
    def scale_change(self, factor: torch.Tensor) -> None:
        """Multiply Q by `factor` (max-norm): Q is linear in the blocks."""
        self.oft_blocks.mul_(factor.to(self.oft_blocks.dtype))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The blocks with the constraint folded in: their skew part is the bounded Q (alpha is written 0)."""
        with torch.no_grad():
            blocks = self.oft_blocks.detach().float()
            q = skew(blocks)
            return {OFT_BLOCKS: blocks * (bounded(q, self.constraint).norm() / q.norm().clamp(min=1e-30))
                    if self.constraint > 0 else blocks}

    def export(self, exact: bool = True) -> FileModule:
        return FileModule(self.file_tensors(), 0.0, "own")  # alpha 0: no loader bounds Q again

    @classmethod
    @torch.no_grad()
    def from_file(cls, base: nn.Module, tensors: dict[str, torch.Tensor], alpha: float | None) -> OftModule:
        """The module a file's blocks describe, alpha read as LyCORIS reads it (a bound of alpha x out)."""
        blocks = tensors[OFT_BLOCKS]
        if blocks.dim() != 3:
            raise ValueError(f"oft_blocks has {blocks.dim()} dimensions (4 is BOFT, which sdlora does not read)")
        count, size, other = blocks.shape
        if size != other or count * size != base.weight.shape[0]:
            raise ValueError(f"oft_blocks {tuple(blocks.shape)} does not split the weight's "
                             f"{base.weight.shape[0]} output rows")
        module = cls(base, size, float(alpha or 0.0), block_size=size)
        module.oft_blocks.copy_(blocks)
        return module


def oft_report(blocks: torch.Tensor, alpha: float | None) -> dict:
    """What Inspect says of one file module: its blocks, ||Q||_F and the largest rotation angle (degrees; a
    Cayley rotation turns by 2 atan of Q's eigenvalues). The change itself depends on the base weight."""
    q = skew(blocks.float())
    if alpha:  # LyCORIS's bound (alpha x the weight's rows), for files written without it folded in
        q = bounded(q, float(alpha) * blocks.shape[0] * blocks.shape[-1])
    largest = float(torch.linalg.matrix_norm(q, ord=2).max()) if q.numel() else 0.0
    return {"blocks": int(blocks.shape[0]), "block_size": int(blocks.shape[-1]), "q_norm": float(q.norm()),
            "angle_degrees": float(torch.rad2deg(2 * torch.atan(torch.tensor(largest))))}
