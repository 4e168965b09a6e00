"""`[network]`: the adapter's type, ranks, alphas, dropouts, init and targets. Its keys have the names and
defaults of networks/spec.py's `NetworkSpec`, which `spec()` builds and whose rules it validates against."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from networks.block_lr import block_weights, parse_block_values
from networks.errors import SdloraError
from networks.spec import BOUNDS, NetworkInit, NetworkSpec, NetworkType
from trainer.config.section import Section, rule


class NetworkSection(Section):
    type: NetworkType = Field("lora", description="lora adapts attention and linear layers; locon also "
                                                  "adapts 3x3 convolutions; loha / lokr are LyCORIS's Hadamard / "
                                                  "Kronecker products; oft rotates each weight's output rows in "
                                                  "blocks (LyCORIS's diag-oft) (A1111, ComfyUI and LyCORIS load "
                                                  "them, diffusers does not).")
    rank: int = Field(16, **BOUNDS["rank"], description="Rank r: the adapter's capacity and file size. oft: the "
                      "block size b, as LyCORIS's diag-oft dim: each layer's width splits as blocks x size with "
                      "size = the smaller of b and width / b where b divides it, else the most balanced split "
                      "with size <= b.")
    alpha_ratio: float = Field(0.5, **BOUNDS["alpha_ratio"], description="alpha / r; the update is scaled by "
                               "alpha / r, so this stays meaningful when r changes.")
    alpha: float | None = Field(None, **BOUNDS["alpha"],
                                description="Absolute alpha; overrides alpha_ratio when set. oft: COFT's bound "
                                            "||Q|| <= alpha x the layer's width (unset: no bound).")
    include_convs: bool = Field(False, description="loha / lokr / oft: also adapt the ResNet convolutions and samplers "
                                                   "at conv_rank, as locon does (LyCORIS's conv_dim).")
    factor: int = Field(-1, ge=-1, description="lokr: LyCORIS's factor; each weight side splits as a x b with a = "
                                               "factor where it divides, -1 = the most balanced split.")
    decompose_both: bool = Field(False, description="lokr: the small Kronecker half as a rank-r product too.")
    conv_rank: int = Field(8, **BOUNDS["conv_rank"],
                           description="Rank of the 3x3 convolution adapters (locon).")
    conv_alpha_ratio: float = Field(0.5, **BOUNDS["conv_alpha_ratio"],
                                    description="conv alpha / conv rank (locon).")
    conv_alpha: float | None = Field(None, **BOUNDS["conv_alpha"],
                                     description="Absolute conv alpha; overrides conv_alpha_ratio.")
    dropout: float = Field(0.0, **BOUNDS["dropout"], description="Dropout on the adapter's hidden features.")
    rank_dropout: float = Field(0.0, **BOUNDS["rank_dropout"],
                                description="Chance of dropping each rank component per step.")
    module_dropout: float = Field(0.0, **BOUNDS["module_dropout"],
                                  description="Chance of skipping a whole adapter per step.")
    init: NetworkInit = Field("kaiming", description="kaiming/gaussian: random down matrix, zero up matrix; "
                                                     "pissa/loraga start from the base weight's principal "
                                                     "directions / the first gradient (the base is adjusted).")
    rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r (exported "
                                            "with alpha x sqrt(r), so every generator loads it right).")
    loraga_batches: int = Field(4, ge=1, le=256, description="Batches whose gradient initialises LoRA-GA.")
    weights: str | None = Field(None, description=(
        "Continue training this LoRA file (kohya's network_weights): its modules keep their ranks, alphas and "
        "weights; modules it lacks start fresh with rank and alpha above."))
    export: Literal["exact", "svd"] = Field(
        "exact", description="After a PiSSA/LoRA-GA init: export the true change at rank 2r (exact) or "
                             "re-ranked to r by SVD (the error is reported).")
    train_unet: bool = Field(True, description="Attach adapters to the UNet.")
    train_text_encoder: bool = Field(False, description="Attach adapters to the text encoder(s) too.")
    include_conv_in_out: bool = Field(False, description="Also adapt the UNet's first and last convolutions.")
    include_time_embedding: bool = Field(False, description="Also adapt the timestep embedding layers.")
    target_modules: list[str] | None = Field(
        None, description="Adapt only modules whose path ends with one of these (e.g. to_q, to_k, to_v, "
                          "to_out.0); empty = every module the type adapts.")
    down_lr_weight: str | None = Field(
        None, description="kohya's block learning rates for the UNet's input blocks IN00-IN11 (SDXL IN00-IN08): "
                          "numbers like 0,0,0,0.5,1 (missing ones are 1) or sine, cosine, linear, reverse_linear, "
                          "zeros with an optional +offset; a block at 0 gets no adapter.")
    mid_lr_weight: str | None = Field(None, description="The same for the middle block (SDXL: 3).")
    up_lr_weight: str | None = Field(
        None, description="The same for the output blocks OUT00-OUT11 (SDXL OUT00-OUT08).")
    block_lr_zero_threshold: float = Field(0.0, ge=0, description="Block weights at or below this count as 0 "
                                                                  "(no adapter).")
    block_dims: str | None = Field(
        None, description="kohya's rank per UNet block, one per block (25 for SD1/SD2: IN00-IN11, MID, OUT00-OUT11; "
                          "23 for SDXL); 0 = no adapter in that block. Empty = rank for every block.")
    block_alphas: str | None = Field(None, description="Alpha per block, like block_dims; empty = alpha / "
                                                       "alpha_ratio applied to each block's rank.")
    conv_block_dims: str | None = Field(None, description="Rank of the 3x3 convolutions per block (locon); "
                                                          "empty = conv_rank everywhere.")
    conv_block_alphas: str | None = Field(None, description="Alpha of the 3x3 convolutions per block; empty = "
                                                            "conv_alpha / conv_alpha_ratio applied to each rank.")

    def spec(self) -> NetworkSpec:
        """The adapters these keys describe, with the same field names (alpha as given, not resolved, so
        per-block ranks keep alpha / r too)."""
        fields = {name: getattr(self, name) for name in NetworkSpec.__dataclass_fields__}
        fields["target_modules"] = tuple(self.target_modules) if self.target_modules else None
        return NetworkSpec(**fields)

    # The spec's own rules, so the config, the trainer and the UI resolve alpha one way.
    resolved_alpha = property(lambda self: self.spec().resolved_alpha)
    resolved_conv_alpha = property(lambda self: self.spec().resolved_conv_alpha)
    adapts_convs = property(lambda self: self.spec().adapts_convs)

    @model_validator(mode="after")
    def _block_settings_read(self) -> NetworkSection:
        try:
            for sdxl in (False, True):  # the syntax, for either block count; the family is known only at load
                block_weights(sdxl, self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight)
            for key in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
                parse_block_values(getattr(self, key), f"network.{key}", whole=key.endswith("dims"))
        except SdloraError as error:
            raise rule(str(error).rstrip(".")) from None
        return self

    @model_validator(mode="after")
    def _spec_rules_hold(self) -> NetworkSection:
        problem = self.spec().rule_problem()  # the spec's rules, so specs built in code meet the same ones
        if problem:
            raise rule(problem)
        if self.weights and self.init in ("pissa", "loraga"):
            raise rule(f"network.weights continues a LoRA file, but network.init {self.init} would start from the "
                       "base weight instead; use network.init kaiming or gaussian")
        return self
