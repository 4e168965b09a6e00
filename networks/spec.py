"""`NetworkSpec`: what to attach, torch-free, so the config, the pre-flight report and the UI read it without
loading torch. Its field names and defaults are `[network]`'s (trainer's NetworkSection builds it with
`.spec()`; a test holds the two equal), and the enumerations here are the ones the config validates against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from .block_lr import block_weights
from .errors import SdloraError

FamilyName = Literal["sd1", "sd2", "sdxl"]
FAMILIES: tuple[str, ...] = get_args(FamilyName)
NetworkType = Literal["lora", "locon", "loha", "lokr", "oft", "dora"]
# How the down/A matrix starts; pissa and loraga move the base weight too (networks/inits.py applies them).
NetworkInit = Literal["kaiming", "gaussian", "pissa", "loraga"]
NETWORK_TYPES: tuple[str, ...] = get_args(NetworkType)
INITS: tuple[str, ...] = get_args(NetworkInit)
LYCORIS_TYPES = ("loha", "lokr", "oft")
DROPOUT_KEYS = ("dropout", "rank_dropout", "module_dropout")
MAX_RANK = 1024
# The bounds of the spec's numbers, in pydantic's Field words: the config's [network] fields are declared
# with them (the UI's form reads its limits there) and `validate` checks them for specs built in code.
BOUNDS: dict[str, dict[str, float]] = {
    "rank": {"ge": 1, "le": MAX_RANK}, "conv_rank": {"ge": 1, "le": MAX_RANK},
    **{key: {"gt": 0} for key in ("alpha", "conv_alpha", "alpha_ratio", "conv_alpha_ratio")},
    **{key: {"ge": 0, "lt": 1} for key in DROPOUT_KEYS},
}


def within(value: float, bounds: dict[str, float]) -> bool:
    """Whether `value` meets pydantic-style bounds (ge, gt, le, lt)."""
    return (value >= bounds.get("ge", -math.inf) and value > bounds.get("gt", -math.inf)
            and value <= bounds.get("le", math.inf) and value < bounds.get("lt", math.inf))


def alpha_for(alpha: float | None, alpha_ratio: float, rank: int) -> float:
    """The one alpha rule: an absolute alpha when given, else alpha_ratio x rank (so alpha follows r and the
    scale alpha / r stays put when r changes)."""
    return float(alpha) if alpha is not None else alpha_ratio * rank


def scale_for(alpha: float, rank: int, rslora: bool = False) -> float:
    """The one scale rule: an adapter's update is multiplied by alpha / r, or alpha / sqrt(r) with rsLoRA
    (Kalajdzievski 2023: larger ranks keep learning)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


@dataclass
class NetworkSpec:
    """What to attach: `[network]`'s keys that shape the adapters (not the file or optimizer settings)."""

    type: str = "lora"
    rank: int = 16
    alpha: float | None = None
    alpha_ratio: float = 0.5
    conv_rank: int = 8
    conv_alpha: float | None = None
    conv_alpha_ratio: float = 0.5
    init: str = "kaiming"
    rslora: bool = False
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    train_unet: bool = True
    train_text_encoder: bool = False
    include_conv_in_out: bool = False
    include_time_embedding: bool = False
    include_convs: bool = False  # LoCon's conv modules for any type (locon always has them)
    factor: int = -1  # LoKr: LyCORIS's factorization bound (-1: the most balanced split)
    decompose_both: bool = False  # LoKr: w1 as a rank-r product too (LyCORIS's decompose_both)
    # Restrict to modules whose path ends with one of these (e.g. "to_q", "ff.net.2"); None = the table.
    target_modules: tuple[str, ...] | None = None
    # kohya's block-wise learning rates (see block_lr.py): per-block multipliers; blocks at 0 get no adapter.
    down_lr_weight: str | tuple[float, ...] | None = None
    mid_lr_weight: str | tuple[float, ...] | None = None
    up_lr_weight: str | tuple[float, ...] | None = None
    block_lr_zero_threshold: float = 0.0
    # kohya's ranks and alphas per UNet block (one entry per block); rank 0 = no adapter. Alphas default to
    # alpha (or alpha_ratio x the block's rank); 3x3 convs keep conv_rank unless conv_block_dims is set.
    block_dims: str | tuple[int, ...] | None = None
    block_alphas: str | tuple[float, ...] | None = None
    conv_block_dims: str | tuple[int, ...] | None = None
    conv_block_alphas: str | tuple[float, ...] | None = None

    def block_weights(self, family: str) -> list[float] | None:
        return block_weights(family == "sdxl", self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight,
                             self.block_lr_zero_threshold)

    @property
    def resolved_alpha(self) -> float:
        return alpha_for(self.alpha, self.alpha_ratio, self.rank)

    @property
    def resolved_conv_alpha(self) -> float:
        return alpha_for(self.conv_alpha, self.conv_alpha_ratio, self.conv_rank)

    def alpha_at(self, rank: int, conv: bool) -> float:
        """The alpha of an adapter of `rank` (a block's own rank): the rule applied to that rank."""
        if conv:
            return alpha_for(self.conv_alpha, self.conv_alpha_ratio, rank)
        return alpha_for(self.alpha, self.alpha_ratio, rank)

    def scale(self, conv: bool = False) -> float:
        """The scale of the spec's linear (or, with `conv`, 3x3-conv) adapters: alpha / r, rsLoRA's alpha /
        sqrt(r) when `rslora` (a block's own rank aside)."""
        if conv:
            return scale_for(self.resolved_conv_alpha, self.conv_rank, self.rslora)
        return scale_for(self.resolved_alpha, self.rank, self.rslora)

    @property
    def adapts_convs(self) -> bool:
        """Whether the 3x3 convs get adapters (at conv_rank): locon, or loha / lokr with include_convs."""
        return self.type == "locon" or self.include_convs

    def validate(self) -> None:
        """The checks the config's validation also makes, for specs built in code (tests, bench, tools)."""
        if self.type not in NETWORK_TYPES:
            raise SdloraError(f"network.type must be one of {', '.join(NETWORK_TYPES)} (got '{self.type}').")
        for key in ("rank", "conv_rank"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < BOUNDS[key]["ge"]:
                raise SdloraError(f"network.{key} must be an integer >= 1 (got {value}).")
            if not within(value, BOUNDS[key]):
                raise SdloraError(f"network.{key} must be an integer <= {MAX_RANK} (got {value}).")
        for key in ("alpha", "conv_alpha", "alpha_ratio", "conv_alpha_ratio"):
            value = getattr(self, key)
            if value is not None and not within(value, BOUNDS[key]):
                raise SdloraError(f"network.{key} must be > 0 (got {value}).")
        for key in DROPOUT_KEYS:
            value = getattr(self, key)
            if not within(value, BOUNDS[key]):
                raise SdloraError(f"network.{key} must be in [0, 1) (got {value}).")
        if self.init not in INITS:
            raise SdloraError(f"network.init must be one of {', '.join(INITS)} (got '{self.init}').")
        problem = self.rule_problem()
        if problem:
            raise SdloraError(problem + ".")

    def rule_problem(self) -> str | None:
        """The first rule across the keys that this spec breaks, as a sentence without its full stop, or None.
        `validate` and the config's validation both ask here, so a rule and its sentence are written once."""
        if not (self.train_unet or self.train_text_encoder):
            return "network.train_unet and network.train_text_encoder are both false; enable at least one"
        if self.type in LYCORIS_TYPES and self.init != "kaiming":
            return (f"network.init {self.init} is for lora and locon; {self.type} starts as LyCORIS starts it, "
                    "so leave network.init at kaiming")
        if self.type == "dora" and self.init in ("pissa", "loraga"):
            return (f"network.init {self.init} moves the base weight, whose norms dora's magnitude starts from; "
                    "use network.init kaiming or gaussian with dora")
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or not (self.factor == -1 or self.factor >= 1):
            return "network.factor must be -1 (the balanced split) or an integer >= 1"
        return None
