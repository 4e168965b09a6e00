"""The training timesteps' distribution (train.timestep_distribution) as a text histogram, drawn by the run's
own function (trainer/objective/timesteps.py), and its parameters that do nothing for the chosen one."""

from __future__ import annotations

from trainer.config import TrainSection
from trainer.objective.timesteps import timestep_shares
from trainer.preflight.context import CheckContext

TRAIN_TIMESTEPS = 1000  # every SD1/SD2/SDXL noise schedule's num_train_timesteps
SPARKS = " ▁▂▃▄▅▆▇█"
EIGHTHS = " ▏▎▍▌▋▊▉█"
BAR_WIDTH = 24
# Each parameter key and the one distribution that reads it.
PARAMETERS = {"timestep_mean": "logit_normal", "timestep_std": "logit_normal", "timestep_sigmoid_scale": "sigmoid",
              "timestep_beta_a": "beta", "timestep_beta_b": "beta", "timestep_heavy_tail_scale": "heavy_tail",
              "timestep_parabola_weight": "inverted_parabola", "timestep_parabola_bias": "inverted_parabola"}


def check_timesteps(ctx: CheckContext) -> None:
    train, report = ctx.cfg.train, ctx.report
    kind = train.timestep_distribution
    shares = timestep_shares(train, TRAIN_TIMESTEPS)
    low, high = shares[0][0], shares[-1][1]
    top = max(share for *_, share in shares)
    report.info.append(f"Timesteps are drawn {_in_words(train)} from {low} to {high}: {sparkline(shares)} "
                       f"({len(shares)} bins; the fullest holds {top:.0%} of the draws).")
    if kind != "uniform":  # a flat line needs no bars
        report.info.extend(histogram_bars(shares))
    report.data["timesteps"] = {"distribution": kind,
                                "bins": [{"first": f, "last": la, "share": round(s, 4)} for f, la, s in shares]}
    for key, owner in PARAMETERS.items():
        if owner != kind and getattr(train, key) != TrainSection.model_fields[key].default:
            report.warnings.append(f"train.{key} shapes timestep_distribution {owner}, but this run draws {kind}, "
                                   f"so it does nothing; set train.timestep_distribution = {owner} or reset it.")


def sparkline(shares: list[tuple[int, int, float]]) -> str:
    """One character per bin, its height the bin's share against the fullest bin's."""
    top = max(share for *_, share in shares) or 1.0
    return "".join(SPARKS[max(1, round(share / top * 8))] if share else SPARKS[0] for *_, share in shares)


def histogram_bars(shares: list[tuple[int, int, float]]) -> list[str]:
    """A line per bin, 't 100-179 ████▌ 12.3%', bars in eighths of a block, the fullest BAR_WIDTH long."""
    top = max(share for *_, share in shares) or 1.0
    digits = len(str(shares[-1][1]))
    lines = []
    for first, last, share in shares:
        eighths = round(share / top * BAR_WIDTH * 8)
        bar = "█" * (eighths // 8) + (EIGHTHS[eighths % 8] if eighths % 8 else "")
        lines.append(f"t {first:>{digits}}-{last:<{digits}} {bar:<{BAR_WIDTH}} {share:6.1%}")
    return lines


def _in_words(train: TrainSection) -> str:
    kind = train.timestep_distribution
    return {"uniform": "uniformly",
            "logit_normal": f"logit-normal (mean {train.timestep_mean:g}, std {train.timestep_std:g})",
            "sigmoid": f"as a sigmoid of a normal (scale {train.timestep_sigmoid_scale:g})",
            "beta": f"from Beta({train.timestep_beta_a:g}, {train.timestep_beta_b:g})",
            "cos_map": "by SD3's cos-map",
            "heavy_tail": f"heavy-tailed (SD3's s {train.timestep_heavy_tail_scale:g})",
            "inverted_parabola": f"from an inverted parabola (weight {train.timestep_parabola_weight:g}, "
                                 f"bias {train.timestep_parabola_bias:g})"}[kind]
