"""What a LoRA learned, in numbers: singular-value spectra, effective ranks, subspace similarity, amplification.

Every module's update is the low-rank product delta W = scale * B A (B = lora_up [out, r], A = lora_down
[r, in*kh*kw], scale = alpha / r). Its SVD never needs the [out, in] matrix: with B = Qb Rb and A^T = Qa Ra
(thin QRs), delta W = Qb (scale Rb Ra^T) Qa^T, so the SVD of the r x r core gives the singular values and,
mapped back through Qb / Qa, the singular vectors. That keeps a whole SDXL file's analysis to seconds.
LyCORIS LoHa / LoKr modules are read as exact factors of the same form (their Khatri-Rao / Kronecker
factors, networks/loha.py and networks/lokr.py), so inspect, spectrum and similarity read them too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .adapter import ALPHA
from .errors import SdloraError
from .loha import HADA_W1_A, HADA_W1_B, HADA_W2_A, HADA_W2_B, hadamard_factors
from .lokr import LOKR_W1, LOKR_W1_A, LOKR_W1_B, LOKR_W2, LOKR_W2_A, LOKR_W2_B, kron_factors
from .lora import LORA_DOWN, LORA_UP
from .lycoris_keys import ALGO_NAMES, ALL_SUFFIXES, group_modules, module_algo, split_key
from .naming import PREFIXES, role_of
from .network import LoraNetwork

ENERGY_LEVELS = (0.9, 0.99)


@dataclass
class ModuleFactors:
    """One module of a LoRA file as flat factors: delta W = scale * up @ down, shapes [out, r] and [r, n]."""

    name: str
    up: torch.Tensor
    down: torch.Tensor
    scale: float
    kernel: tuple[int, ...] | None  # (kh, kw) when the file stores 4-D (conv) tensors, else None
    dtype: torch.dtype = torch.float32  # the file's weight dtype, kept when rewriting
    algo: str = "lora"  # "loha" / "lokr": exact factors of a LyCORIS module (rank = their inner size)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def max_rank(self) -> int:
        """The largest rank this module's delta can have: min(out, in * kh * kw)."""
        return min(self.up.shape[0], self.down.shape[1])

    def delta(self) -> torch.Tensor:
        """The full flat [out, in*kh*kw] update, for tests and small modules only."""
        return self.scale * self.up.double() @ self.down.double()


@dataclass
class LowRankSVD:
    """delta W = U diag(S) Vh, with S descending; U [out, k], Vh [k, n] (k <= rank)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


# -- reading ---------------------------------------------------------------------------------------
def check_lora_keys(state: dict[str, torch.Tensor], source: str = "the file", lycoris: bool = True) -> None:
    """Only lora_down / lora_up / alpha keys (and LyCORIS's LoHa/LoKr ones when `lycoris`). Unlike
    lora_file.check_portable (for writing), any alpha dtype passes: kohya saves alpha in the weights' dtype."""
    foreign = [k for k in state if k.split(".", 1)[-1] not in ALL_SUFFIXES or "." not in k]
    if foreign:
        raise SdloraError(f"'{source}' has {len(foreign)} key(s) that are not lora_down/lora_up/alpha "
                          f"(e.g. '{foreign[0]}'); it is not a kohya-layout LoRA file.")
    algos = {module_algo(parts) for parts in group_modules(state).values()} - {"lora", None}
    if "oft" in algos and not lycoris:
        raise SdloraError(f"'{source}' is a LyCORIS OFT file, whose update rotates each base weight's output rows "
                          "and has no rank-r factors to truncate or add up; resize and mix take LoRA/LoCon files, "
                          "so keep it as it is or train it at the block size you want.")
    if "dora" in algos and not lycoris:
        raise SdloraError(f"'{source}' is a DoRA file, whose learned magnitude renormalises every column of W + "
                          "up @ down, so its change is no rank-r product to truncate or add up; resize and mix "
                          "take LoRA/LoCon files, so keep it as it is or train it at the rank you want.")
    if algos and not lycoris:
        raise SdloraError(f"'{source}' is a LyCORIS {'/'.join(sorted(ALGO_NAMES[a] for a in algos))} file, "
                          "whose update is a Hadamard or Kronecker product with no rank-r factors to truncate "
                          "or add up; resize and mix take LoRA/LoCon files, so keep it as it is or train it "
                          "at the rank you want.")


def module_problem(parts: dict[str, torch.Tensor]) -> str | None:
    """What keeps one module of a file from being analysed, as a clause naming its key: a weight that is not
    a matrix (0-dim, 1-D), rank 0 (an empty weight) or NaN / infinite values; None for a sound module."""
    for key, tensor in parts.items():
        if key == ALPHA:
            if tensor.numel() != 1:
                return f"its alpha holds {tensor.numel()} values instead of one; the file is damaged there"
        elif tensor.dim() < 2:
            return f"its {key} is a {tensor.dim()}-dim tensor, not a matrix; the file is damaged there"
        elif tensor.numel() == 0:
            return f"it has rank 0 ({key} is {list(tensor.shape)}), so it changes nothing"
    for key, tensor in parts.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"its {key} holds NaN or infinite values, so its update is undefined"
    return None


def split_analysable(state: dict[str, torch.Tensor], source: str = "the file",
                     lycoris: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the state without the modules that cannot be analysed, {module name: why it was left out}), so a
    report on the rest can name the odd ones; a non-LoRA file is one SdloraError (check_lora_keys)."""
    check_lora_keys(state, source, lycoris)
    odd = {name: f"Module '{name}' was left out: {problem}." for name, parts in group_modules(state).items()
           if (problem := module_problem(parts)) is not None}
    return {key: tensor for key, tensor in state.items() if split_key(key)[0] not in odd}, odd


def lora_factors(state: dict[str, torch.Tensor], source: str = "the file",
                 lycoris: bool = True) -> dict[str, ModuleFactors]:
    """Every module of a kohya-layout state dict as flat factors, in model order; a non-LoRA file (or a
    LyCORIS one when not `lycoris`) or a module that cannot be analysed (module_problem) is one SdloraError."""
    check_lora_keys(state, source, lycoris)
    modules = group_modules(state)
    factors = {}
    for name in sorted(modules, key=lambda n: (block_order(n), n)):
        problem = module_problem(modules[name])
        if problem is not None:
            raise SdloraError(f"Module '{name}' in {source} cannot be analysed: {problem}.")
        algo = module_algo(modules[name])
        if algo == "oft":
            raise SdloraError(f"Module '{name}' in {source} is LyCORIS OFT, whose update rotates the base "
                              "weight's output rows and has no low-rank factors; the spectrum, subspace similarity "
                              "and amplification do not apply to OFT (Inspect shows its blocks and angles).")
        if algo in ("loha", "lokr"):
            factors[name] = _lycoris_factors(name, algo, modules[name], source)
            continue
        down, up = state.get(f"{name}.{LORA_DOWN}"), state.get(f"{name}.{LORA_UP}")
        if down is None or up is None:
            raise SdloraError(f"Module '{name}' in {source} lacks lora_down or lora_up weights; "
                              "choose a complete LoRA/LoCon file.")
        if up.shape[1] != down.shape[0] or up.dim() not in (2, 4) or down.dim() not in (2, 4):
            raise SdloraError(f"Module '{name}' in {source} has lora_up {tuple(up.shape)} and lora_down "
                              f"{tuple(down.shape)}, which do not multiply; the file is damaged.")
        alpha = state.get(f"{name}.{ALPHA}")
        rank = down.shape[0]
        scale = (float(alpha) if alpha is not None else float(rank)) / rank
        kernel = tuple(down.shape[2:]) if down.dim() == 4 else None
        # a DoRA module's spectrum is its direction's update scale * up @ down (its magnitude aside)
        factors[name] = ModuleFactors(name, up.flatten(1).float(), down.flatten(1).float(), scale, kernel,
                                      down.dtype, algo or "lora")
    return factors


def _lycoris_factors(name: str, algo: str, parts: dict[str, torch.Tensor], source: str) -> ModuleFactors:
    """A LoHa / LoKr module as exact flat factors, its scale read as LyCORIS reads it."""
    weights = {key: tensor.float() for key, tensor in parts.items() if key != ALPHA}
    try:
        if algo == "loha":
            w1b = weights[HADA_W1_B]
            up, down = hadamard_factors(weights[HADA_W1_A], w1b.flatten(1), weights[HADA_W2_A],
                                        weights[HADA_W2_B].flatten(1))
            dim, full = w1b.shape[0], False
        else:
            w1 = weights[LOKR_W1] if LOKR_W1 in weights else weights[LOKR_W1_A] @ weights[LOKR_W1_B]
            w2 = (weights[LOKR_W2].flatten(1) if LOKR_W2 in weights
                  else weights[LOKR_W2_A] @ weights[LOKR_W2_B].flatten(1))
            up, down = kron_factors(w1, w2)
            inner = weights.get(LOKR_W1_A, weights.get(LOKR_W2_A))
            dim, full = (inner.shape[1], False) if inner is not None else (1, True)
    except (KeyError, RuntimeError) as error:
        raise SdloraError(f"{ALGO_NAMES[algo]} module '{name}' in {source} is incomplete or its factors do not "
                          f"multiply ({error}); the file is damaged.") from None
    alpha = parts.get(ALPHA)
    scale = 1.0 if full else (float(alpha) if alpha is not None else float(dim)) / dim
    dtype = next(iter(t.dtype for k, t in parts.items() if k != ALPHA))
    return ModuleFactors(name, up, down, scale, None, dtype, algo)


# -- the SVD of a product, through QR --------------------------------------------------------------
def factored_svd(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> LowRankSVD:
    """SVD of scale * up @ down ([out, r] @ [r, n]) from an r x r core; never builds the [out, n] matrix.

    Computed in float64: the core is tiny and the QRs are the only O(out * r^2) work.
    """
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(scale * (r_up @ r_down.T), full_matrices=False)
    return LowRankSVD(q_up @ u, s, vh @ q_down.T)


def module_svd(module: ModuleFactors) -> LowRankSVD:
    return factored_svd(module.up, module.down, module.scale)


# -- effective rank -------------------------------------------------------------------------------
def energy_rank(singular_values: torch.Tensor, fraction: float) -> int:
    """The fewest leading singular values whose squares hold `fraction` of the total (Frobenius) energy."""
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # a relative tolerance so that fraction 1.0 is reached despite rounding in the cumulative sum
    return int((cumulative < fraction - 1e-12).sum()) + 1


def entropy_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p_i = s_i / sum(s): 1 for one direction, k for k equal ones."""
    s = singular_values.double()
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


# -- blocks --------------------------------------------------------------------------------------
_BLOCK_PATTERNS = [
    # (regex on the name after the prefix, label, order of the section within its component)
    (re.compile(r"^(down_blocks|input_blocks)_(\d+)_"), "{0}.{1}", 0),
    (re.compile(r"^(mid_block|middle_block)_"), "{0}", 1),
    (re.compile(r"^(up_blocks|output_blocks)_(\d+)_"), "{0}.{1}", 2),
    (re.compile(r"^(?:text_model_)?encoder_(layers)_(\d+)_"), "{0}.{1}", 0),
]


def block_of(name: str) -> str:
    """The block a module belongs to, e.g. 'unet down_blocks.0', 'unet middle_block', 'te1 layers.3'."""
    return _block_key(name)[1]


def block_order(name: str) -> tuple:
    """Sort key listing blocks as the model runs them: UNet in, middle, out; then each text encoder's layers."""
    return _block_key(name)[0]


def _block_key(name: str) -> tuple[tuple, str]:
    component = role_of(name) or "other"
    rest = name[len(PREFIXES[component]):] if component in PREFIXES else name
    component_order = list(PREFIXES).index(component) if component in PREFIXES else len(PREFIXES)
    for pattern, label, section in _BLOCK_PATTERNS:
        m = pattern.match(rest)
        if m:
            index = int(m.group(2)) if m.lastindex and m.lastindex >= 2 else 0
            return (component_order, section, index), f"{component} {label.format(*m.groups())}"
    return (component_order, 9, 0), f"{component} other"


# -- spectrum -------------------------------------------------------------------------------------
def module_spectrum(module: ModuleFactors) -> dict:
    s = module_svd(module).S
    report = {"block": block_of(module.name), "rank": module.rank, "max_rank": module.max_rank,
              "singular_values": [float(v) for v in s], "norm": float(s.norm()),
              "entropy_rank": entropy_rank(s)}
    for fraction in ENERGY_LEVELS:
        report[f"energy_rank_{round(fraction * 100)}"] = energy_rank(s, fraction)
    return report


def spectrum(state: dict[str, torch.Tensor], source: str = "the file") -> dict:
    """{"modules": {name: {...}}, "blocks": {block: {...}}, "left_out": {name: why}}: per-module singular values
    and effective ranks, per block the module count, the mean effective ranks and the block's total update
    norm; modules that cannot be analysed (NaN, rank 0, not a matrix) are left out and named."""
    analysable, left_out = split_analysable(state, source)
    modules = {name: module_spectrum(m) for name, m in lora_factors(analysable, source).items()}
    return {"modules": modules, "blocks": block_summary(modules), "left_out": left_out}


def block_summary(modules: dict[str, dict]) -> dict[str, dict]:
    """Group per-module reports by block (in model order): module count, the block's total update norm and
    the mean of rank, effective ranks and (when computed) amplification."""
    grouped: dict[str, list[dict]] = {}
    for name in sorted(modules, key=lambda n: (block_order(n), n)):
        grouped.setdefault(block_of(name), []).append(modules[name])
    summary = {}
    for block, reports in grouped.items():
        row = {"modules": len(reports),
               "norm": math.sqrt(sum(r["norm"] ** 2 for r in reports if "norm" in r))}
        for key in ("rank", "entropy_rank", "energy_rank_90", "energy_rank_99", "amplification"):
            values = [r[key] for r in reports if r.get(key) is not None]
            if values:
                row[f"mean_{key}"] = sum(values) / len(values)
        summary[block] = row
    return summary


# -- subspace similarity (LoRA paper, section 7.2) -------------------------------------------------
SIDES = ("down", "up")


def subspace_basis(module: ModuleFactors, side: str = "down") -> torch.Tensor:
    """Orthonormal columns, ordered by singular value, spanning what the paper compares.

    side="down" follows Hu et al. (2021) section 7.2 exactly: the right-singular vectors of A (lora_down,
    [r, n]), i.e. the directions of the input space the module reads, as columns of an [n, r] matrix.
    side="up" uses the left-singular vectors of B (lora_up, [out, r]): the output directions it writes.
    The scale does not change singular vectors, so it plays no part.
    """
    if side == "down":
        return torch.linalg.svd(module.down.double(), full_matrices=False)[2].T
    if side == "up":
        return torch.linalg.svd(module.up.double(), full_matrices=False)[0]
    raise SdloraError(f"Unknown side '{side}'; use one of {', '.join(SIDES)}.")


def phi_matrix(basis_a: torch.Tensor, basis_b: torch.Tensor) -> torch.Tensor:
    """phi[i-1, j-1] = ||Ua[:, :i]^T Ub[:, :j]||_F^2 / min(i, j), for every i <= ra, j <= rb.

    1 means the top-i directions of one lie inside the top-j of the other; for independent random
    subspaces of R^d its expectation is max(i, j) / d (E||Ua_i^T Ub_j||_F^2 = i j / d).
    """
    overlap = (basis_a.T @ basis_b) ** 2
    cumulative = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, overlap.shape[0] + 1, dtype=overlap.dtype)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=overlap.dtype)[None, :]
    return cumulative / torch.minimum(i, j)


def subspace_similarity(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], side: str = "down",
                        source_a: str = "the first file", source_b: str = "the second file") -> dict:
    """Per common module: the phi heatmap (list of rows) and two summaries, phi at (1, 1) and at
    (r, r) with r the smaller rank; "mean" averages the heatmaps of the modules sharing the most common shape."""
    a, b = lora_factors(state_a, source_a), lora_factors(state_b, source_b)
    common = sorted(set(a) & set(b), key=lambda n: (block_order(n), n))
    if not common:
        raise SdloraError(f"{source_a} and {source_b} share no module names; compare two LoRAs made for "
                          "the same base model.")
    modules = {}
    for name in common:
        check_same_shape(a[name], b[name], source_a, source_b)
        phi = phi_matrix(subspace_basis(a[name], side), subspace_basis(b[name], side))
        r = min(phi.shape)
        modules[name] = {"block": block_of(name), "phi": phi.tolist(), "top1": float(phi[0, 0]),
                         "full": float(phi[r - 1, r - 1]), "dim": a[name].down.shape[1] if side == "down"
                         else a[name].up.shape[0]}
    return {"side": side, "modules": modules, "mean": mean_heatmap(modules), "only_in_a": sorted(set(a) - set(b)),
            "only_in_b": sorted(set(b) - set(a))}


def mean_heatmap(modules: dict[str, dict]) -> list[list[float]]:
    """The average phi over the modules whose heatmap has the most common shape (ranks may differ by module)."""
    shapes: dict[tuple[int, int], list[torch.Tensor]] = {}
    for report in modules.values():
        phi = torch.tensor(report["phi"])
        shapes.setdefault(tuple(phi.shape), []).append(phi)
    largest = max(shapes.values(), key=len)
    return torch.stack(largest).mean(0).tolist()


def check_same_shape(a: ModuleFactors, b: ModuleFactors, source_a: str, source_b: str) -> None:
    if (a.up.shape[0], a.down.shape[1]) != (b.up.shape[0], b.down.shape[1]):
        raise SdloraError(f"Module '{a.name}' is {a.up.shape[0]}x{a.down.shape[1]} in {source_a} but "
                          f"{b.up.shape[0]}x{b.down.shape[1]} in {source_b}; the files were made for "
                          "different base models.")


# -- amplification factor (LoRA paper, section 7.3) -------------------------------------------------
def amplification(module: ModuleFactors, base_weight: torch.Tensor) -> float:
    """||delta W||_F / ||U^T W V||_F, U and V the top-r singular vectors of delta W, W the base weight.

    Large values mean the LoRA amplifies directions the base weight barely uses (the paper finds ~20 at r=4).
    """
    weight = base_weight.detach().flatten(1).double()
    if tuple(weight.shape) != (module.up.shape[0], module.down.shape[1]):
        raise SdloraError(f"Module '{module.name}' is {module.up.shape[0]}x{module.down.shape[1]} in the LoRA "
                          f"but {weight.shape[0]}x{weight.shape[1]} in the base model; use the base model "
                          "the LoRA was trained on.")
    svd = module_svd(module)
    projected = svd.U.T @ weight @ svd.Vh.T
    denominator = float(projected.norm())
    return float(svd.S.norm()) / denominator if denominator > 0 else math.inf


def amplification_report(family: str, unet: nn.Module | None, text_encoders: list[nn.Module],
                         state: dict[str, torch.Tensor], source: str = "the file") -> dict[str, float]:
    """{module: amplification factor} against the base model's weights; a module the model lacks (a file
    made for another model) is one SdloraError from the loader."""
    network = LoraNetwork.from_state_dict(family, unet, text_encoders, state, source)
    # keyed by the file's own names (the loader renames aliases); it builds one adapter per name, in order
    file_names = sorted({key.split(".", 1)[0] for key in state})
    names = file_names if len(file_names) == len(network.adapters) else list(network.adapters)
    factors = lora_factors(network.kohya_state_dict(), source)  # LoRA and LoHa/LoKr modules alike
    return {name: amplification(factors[adapter_name], adapter.base.weight)
            for name, (adapter_name, adapter) in zip(names, network.adapters.items())}
