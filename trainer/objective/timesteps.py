"""How training timesteps are drawn (`train.timestep_distribution`): a shape over [0, 1] mapped inside
[train.min_timestep, train.max_timestep). Every draw comes from torch's global RNG on the CPU, which the
run's saved state restores, so a resumed run draws the same timesteps as an uninterrupted one.

Hand-written: diffusers' training scripts only draw uniform timesteps (and SD3's density helper is for flow
models' sigmas); the formulas are a line each, from the papers and trainers named beside them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainer.config import TrainSection


def sample_timesteps(batch_size: int, num_train_timesteps: int, device, low: int = 0, high: int | None = None,
                     train: TrainSection | None = None) -> torch.Tensor:
    """`batch_size` integer timesteps in [low, high) (kohya's min_timestep / max_timestep), shaped by
    `train`'s distribution; uniform over all of them by default."""
    high = num_train_timesteps if high is None else min(high, num_train_timesteps)
    kind = "uniform" if train is None else train.timestep_distribution
    if kind == "uniform":  # kohya's and diffusers' draw, kept as it was: runs and resumes repeat bit for bit
        return torch.randint(low, high, (batch_size,)).long().to(device)
    if kind == "inverted_parabola":  # a density over the integers themselves, drawn by its inverse CDF
        return (low + _inverted_parabola(batch_size, high - low, train)).to(device)
    shaped = SHAPES[kind](batch_size, train)
    # u in [0, 1] to the integers: floor(u * n) is uniform on them for a uniform u; u = 1 (a saturated
    # sigmoid) is the last one.
    index = (shaped.double() * (high - low)).floor().long().clamp_(0, high - low - 1)
    return (low + index).to(device)


def _logit_normal(n: int, train: TrainSection) -> torch.Tensor:
    # SD3's logit-normal (Esser et al. 2024, "Scaling Rectified Flow Transformers"): sigmoid of N(mean, std);
    # OneTrainer's LOGIT_NORMAL. mean > 0 trains noisier timesteps more, < 0 cleaner ones.
    return torch.sigmoid(train.timestep_mean + train.timestep_std * torch.randn(n))


def _sigmoid(n: int, train: TrainSection) -> torch.Tensor:
    # kohya's timestep_sampling = "sigmoid" with sigmoid_scale (sd-scripts' flux and SD3 scripts): sigmoid of a
    # scaled N(0, 1); larger scales push the draws toward both ends, smaller ones toward the middle.
    return torch.sigmoid(train.timestep_sigmoid_scale * torch.randn(n))


def _beta(n: int, train: TrainSection) -> torch.Tensor:
    # Beta(a, b), one of OneTrainer's timestep distributions: a = b = 1 is uniform, a > b favours noisy
    # timesteps, a = b > 1 the middle ones.
    return torch.distributions.Beta(train.timestep_beta_a, train.timestep_beta_b).sample((n,))


def _cos_map(n: int, train: TrainSection) -> torch.Tensor:
    # SD3's CosMap (Esser et al. 2024, eq. 21): t = 1 - 1 / (tan(pi u / 2) + 1); OneTrainer's COS_MAP.
    u = torch.rand(n, dtype=torch.float64)
    return 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)


def _heavy_tail(n: int, train: TrainSection) -> torch.Tensor:
    # SD3's "mode sampling with heavy tails" (Esser et al. 2024, eq. 20): f(u) = 1 - u - s (cos^2(pi u / 2)
    # - 1 + u), monotonic for -1 <= s <= 2 / (pi - 2); s > 0 favours the middle timesteps. OneTrainer's HEAVY_TAIL.
    u, s = torch.rand(n, dtype=torch.float64), train.timestep_heavy_tail_scale
    return (1 - u - s * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)).clamp(0, 1)


def _inverted_parabola(n: int, count: int, train: TrainSection) -> torch.Tensor:
    # OneTrainer's INVERTED_PARABOLA, as sdlora writes it: density max(0, 2 - weight (x - 0.5 - bias)^2) over
    # the range's positions x in (0, 1): flat at weight 0, zero at both ends at weight 8, its peak moved by bias.
    x = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    density = (2 - train.timestep_parabola_weight * (x - 0.5 - train.timestep_parabola_bias) ** 2).clamp_min(0)
    if not density.sum():  # a narrow peak between the integers of a tiny range: every one of them
        density = torch.ones_like(density)
    cdf = density.cumsum(0) / density.sum()
    return torch.searchsorted(cdf, torch.rand(n, dtype=torch.float64), right=True).clamp_(max=count - 1)


SHAPES = {"logit_normal": _logit_normal, "sigmoid": _sigmoid, "beta": _beta, "cos_map": _cos_map,
          "heavy_tail": _heavy_tail}


def timestep_shares(train: TrainSection, num_train_timesteps: int, bins: int = 10,
                    draws: int = 20000) -> list[tuple[int, int, float]]:
    """(first, last, share of draws) per bin of the trained range, from `draws` draws of the run's own
    function under a fixed seed; the global RNG is left as it was."""
    low, high = train.min_timestep, min(train.max_timestep, num_train_timesteps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        drawn = sample_timesteps(draws, num_train_timesteps, "cpu", low, high, train)
    edges = [low + round(i * (high - low) / bins) for i in range(bins + 1)]
    edges = sorted(set(edges))  # a range narrower than `bins` has fewer, one integer each
    return [(first, end - 1, float(((drawn >= first) & (drawn < end)).sum()) / draws)
            for first, end in zip(edges, edges[1:])]
