"""`[train]`: the optimizer and its schedule, precision, the noise and timestep options and the loss."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from trainer.config.choices import (
    SEED_MAX,
    LossType,
    LrScheduler,
    MixedPrecision,
    Optimizer,
    OptimizerArg,
    TimestepDistribution,
)
from trainer.config.section import Section


class TrainSection(Section):
    epochs: int = Field(10, ge=1, le=100000, description="Passes over the dataset.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps; "
                                                          "overrides epochs when set.")
    batch_size: int = Field(1, ge=1, le=1024, description="Images per step on each GPU.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Batches summed per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="Learning rate for every adapter without its own.")
    unet_lr: float | None = Field(None, gt=0, description="UNet learning rate; empty = learning_rate.")
    text_encoder_lr: float | None = Field(None, gt=0, description="Text encoder learning rate; "
                                                                  "empty = learning_rate.")
    loraplus_ratio: float = Field(1.0, ge=1, description="LoRA+: learning-rate multiplier for the up (B) "
                                                         "weights; 1 turns it off, 16 is typical.")
    optimizer: Optimizer = Field("adamw", description="adamw8bit needs bitsandbytes, prodigy needs prodigyopt "
                                                      "(use learning_rate 1 with prodigy).")
    optimizer_args: dict[str, OptimizerArg] = Field(
        default_factory=dict, description="Extra optimizer keyword arguments, e.g. {betas = [0.9, 0.99]}.")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay.")
    lr_scheduler: LrScheduler = Field("constant", description="How the learning rate changes over the run.")
    lr_warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up from 0 to the learning rate.")
    lr_scheduler_num_cycles: int = Field(1, ge=1, le=1000, description="Restarts for cosine_with_restarts.")
    lr_scheduler_power: float = Field(1.0, gt=0, description="Power of the polynomial scheduler.")
    # inf is meant here (measure the norm, never clip); nan still fails ge=0.
    max_grad_norm: float = Field(1.0, ge=0, allow_inf_nan=True,
                                 description="Clip gradients to this norm; 0 disables clipping.")
    prior_loss_weight: float = Field(1.0, ge=0, description="Loss weight of regularization images "
                                                             "(dataset.reg_path) against training images.")
    scale_weight_norms: float = Field(0.0, ge=0, description=(
        "kohya's max-norm regularization: after each step, modules whose change (scale x up x down) has a norm "
        "above this are scaled back to it (1 is usual); keeps a LoRA from overcooking. 0 = off."))
    mixed_precision: MixedPrecision = Field(
        "no", description="Compute precision on GPU; bf16 needs an Ampere or newer card.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (slower).")
    memory_budget_gb: float = Field(0.0, ge=0, le=1024, description=(
        "GPU memory the run must fit in, in GiB: the check lists the changes that bring the predicted peak "
        "under it; 0 = the detected card's memory (no budget without a CUDA card)."))
    compile: bool = Field(False, description="Compile the UNet's training step with torch.compile: faster steps "
                                             "after a first one that takes minutes (and again per new bucket "
                                             "shape); for long runs.")
    noise_offset: float = Field(0.0, ge=0, le=1, description="Offset noise (about 0.05) helps very dark "
                                                             "and bright images.")
    noise_offset_random_strength: bool = Field(False, description="Scale the noise offset by a random 0-1 each "
                                                                  "step (kohya's).")
    adaptive_noise_scale: float = Field(0.0, ge=-1, le=1, description=(
        "kohya's adaptive noise: add this times each channel's |mean latent| to the noise offset (needs "
        "noise_offset; about noise_offset / 10); 0 = off."))
    multires_noise_iterations: int = Field(0, ge=0, le=20, description="Multi-resolution (pyramid) noise "
                                                                     "levels, kohya's; 6-10 is typical, 0 off.")
    multires_noise_discount: float = Field(0.3, gt=0, le=1, description="Weight decay per multires noise level.")
    ip_noise_gamma: float | None = Field(None, ge=0, le=1, description="Input perturbation noise (about 0.1) "
                                                                       "against exposure bias; empty disables.")
    ip_noise_gamma_random_strength: bool = Field(False, description="Scale ip_noise_gamma by a random 0-1 each "
                                                                    "step (kohya's).")
    zero_terminal_snr: bool = Field(False, description="Rescale the noise schedule so the last timestep is pure "
                                                       "noise (Lin et al.; kohya's); for v-prediction models.")
    min_timestep: int = Field(0, ge=0, le=999, description="Lowest noise timestep trained (kohya's; 0 = all).")
    max_timestep: int = Field(1000, ge=1, le=1000, description="Timesteps below this are trained (kohya's, "
                                                               "exclusive; 1000 = all).")
    timestep_distribution: TimestepDistribution = Field("uniform", description=(
        "How training timesteps are drawn inside min/max_timestep (OneTrainer's choices): uniform (kohya's), "
        "logit_normal (SD3's; timestep_mean/std), sigmoid (kohya's; timestep_sigmoid_scale), beta "
        "(timestep_beta_a/b), cos_map (SD3's), heavy_tail (SD3's; timestep_heavy_tail_scale) or "
        "inverted_parabola (timestep_parabola_weight/bias). The check shows its histogram."))
    timestep_mean: float = Field(0.0, ge=-3, le=3, description=(
        "logit_normal: the normal's mean (SD3's m, OneTrainer's noising bias); above 0 trains noisier "
        "timesteps more, below 0 cleaner ones."))
    timestep_std: float = Field(1.0, gt=0, le=3, description="logit_normal: the normal's spread (SD3's s); "
                                                             "smaller concentrates the draws in the middle.")
    timestep_sigmoid_scale: float = Field(1.0, gt=0, le=10, description=(
        "sigmoid: the scale of the normal inside the sigmoid (kohya's sigmoid_scale); larger pushes draws "
        "toward both ends."))
    timestep_beta_a: float = Field(1.0, gt=0, le=100, description=(
        "beta: the first shape a; a = b = 1 is uniform, a > b favours noisy timesteps."))
    timestep_beta_b: float = Field(1.0, gt=0, le=100, description=(
        "beta: the second shape b; b > a favours clean timesteps, a = b > 1 the middle ones."))
    timestep_heavy_tail_scale: float = Field(1.29, ge=-1, le=1.75, description=(
        "heavy_tail: SD3's s (1.29 in the paper); above 0 favours the middle timesteps, below 0 both ends."))
    timestep_parabola_weight: float = Field(8.0, ge=0, le=100, description=(
        "inverted_parabola: its curvature (OneTrainer's noising weight): 0 is flat, 8 reaches zero at both "
        "ends, more narrows the peak."))
    timestep_parabola_bias: float = Field(0.0, ge=-0.5, le=0.5, description=(
        "inverted_parabola: moves its peak from the middle of the range (OneTrainer's noising bias); above "
        "0 toward noisy timesteps."))
    preservation_caption: str = Field("", max_length=1000, description=(
        "Output preservation (kohya's Differential Output Preservation, ai-toolkit's DOP): beside each step the "
        "base model (adapters off) and the LoRA predict the same noisy latents for this caption, usually the "
        "class words without the trigger (e.g. 'a photo of a woman'), and the LoRA is pulled toward the base "
        "so it changes only what the trigger asks for; no regularization images. About 2x the step's compute. "
        "Empty = off."))
    preservation_weight: float = Field(1.0, gt=0, le=100, description=(
        "Output preservation: weight of the base-versus-LoRA error for preservation_caption against the "
        "training loss (the step's reported loss includes it)."))
    scale_v_pred_loss_like_noise_pred: bool = Field(False, description=(
        "v-prediction models: weight the loss by SNR/(SNR+1) so it behaves like an epsilon model's (kohya's)."))
    v_pred_like_loss: float = Field(0.0, ge=0, description="Add this much of a v-prediction-like loss (kohya's; "
                                                           "about 0.1); 0 = off.")
    debiased_estimation: bool = Field(False, description="Weight the loss by 1/sqrt(SNR) (debiased "
                                                         "estimation, kohya's debiased_estimation_loss).")
    loss_type: LossType = Field(
        "l2", description="l2 (mean squared error), or kohya's pseudo-Huber / smooth L1, which outlier "
                          "pixels pull on less.")
    huber_c: float = Field(0.1, gt=0, le=1, description="Huber parameter: the error size where the loss turns "
                                                        "from quadratic to linear.")
    huber_schedule: Literal["snr", "exponential", "constant"] = Field(
        "snr", description="How huber_c varies with the timestep (kohya's default: snr).")
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting gamma (5 is "
                                                                "typical); empty disables.")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Random seed for shuffling, noise and dropout.")

    @field_validator("preservation_caption")
    @classmethod
    def _caption_not_blank(cls, caption: str) -> str:
        if caption and not caption.strip():  # "" is off; spaces alone would encode an empty prompt
            raise PydanticCustomError("sdlora_value", "is only spaces; give the class words, e.g. 'a photo of a "
                                                      "woman', or leave it empty")
        return caption
