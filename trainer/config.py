"""The training config: one pydantic model that presets, CLI flags, the UI form and the run folder share.

Every key a user can set lives here, with its bounds and a short description (the UI builds its Advanced
form from `config_field_table`). Validation errors never escape as pydantic tracebacks: they become one
`SdloraError` sentence naming the dotted key, e.g. "network.rank must be an integer >= 1 (got 0).".
"""
from __future__ import annotations

import difflib
import os
import re
import tempfile
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from networks.block_lr import block_weights, parse_block_values
from networks.errors import SdloraError
from trainer.sample_prompts import OPTION_HELP, parse_prompt_line

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

Family = Literal["auto", "sd1", "sd2", "sdxl"]
PredictionType = Literal["auto", "epsilon", "v_prediction"]
NetworkType = Literal["lora", "locon", "loha", "lokr"]
# How the down/A matrix starts. New schemes (rslora, pissa, loraga) are added here and in networks/lora.py.
NetworkInit = Literal["kaiming", "gaussian", "pissa", "loraga"]
Optimizer = Literal["adamw", "adamw8bit", "lion", "prodigy", "adafactor"]
# The names diffusers.optimization.get_scheduler accepts, so the loop can pass the value straight through.
LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
Sampler = Literal["euler_a", "euler", "ddim", "dpmpp_2m"]
# Built-in models and their family: demo:shapes was pretrained to draw (docs/DEMO_MODEL.md); the other
# three have random weights and exist so every family's layout can be tried and tested in seconds.
DEMO_MODELS = {"demo:shapes": "sd1", "demo:sd1": "sd1", "demo:sd2": "sd2", "demo:sdxl": "sdxl"}
SEED_MAX = 2**32 - 1  # numpy's limit; torch accepts more, but a seed must work everywhere
OptimizerArg = float | int | bool | str | list[float]


class ConfigError(SdloraError):
    """A config that failed validation; `key` is the dotted key at fault ("" for the whole file)."""

    def __init__(self, message: str, key: str = "", source: str | None = None):
        super().__init__(message)
        self.key = key
        self.source = source


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _rule(message: str) -> PydanticCustomError:
    """A cross-field error whose message is already a full sentence naming its keys."""
    return PydanticCustomError("sdlora_rule", message)


class ModelSection(Section):
    path: str = Field("demo:sd1", description="Base model: a diffusers folder, a .safetensors/.ckpt file, "
                                              "demo:shapes (the tiny built-in model that draws) or "
                                              "demo:sd1, demo:sd2, demo:sdxl (tiny, random weights).")
    family: Family = Field("auto", description="Model family; auto detects it from the model.")
    prediction_type: PredictionType = Field(
        "auto", description="What the UNet predicts; auto reads it from the model (v_prediction for SD2-768).")
    config_dir: str | None = Field(
        None, description="Diffusers config folder for a single-file model, instead of the shipped one.")
    vae: str | None = Field(None, description="Another VAE for latents and previews (kohya's vae): an A1111-style "
                                              ".safetensors/.ckpt/.pt file or a diffusers VAE folder; empty = the "
                                              "model's own.")
    clip_skip: int = Field(1, ge=1, le=12, description="Read prompts from this text-encoder layer, counted "
                                                       "from the end: 1 = last; 2 = penultimate (A1111's clip "
                                                       "skip 2, usual for anime SD1 models).")
    max_token_length: Literal[75, 150, 225] = Field(
        75, description="Caption tokens the text encoder reads: 75 (one CLIP window; longer captions are cut) "
                        "or 150 / 225 (two or three windows side by side, as A1111 and ComfyUI read long prompts; "
                        "kohya's max_token_length) for long tag lists.")

    @property
    def prompt_chunks(self) -> int:
        """75-token windows per prompt."""
        return self.max_token_length // 75

    @field_validator("path")
    @classmethod
    def _known_demo(cls, path: str) -> str:
        if path.startswith("demo:") and path not in DEMO_MODELS:
            raise PydanticCustomError("sdlora_value", "must be one of " + ", ".join(DEMO_MODELS))
        return path

    @model_validator(mode="after")
    def _demo_matches_family(self) -> ModelSection:
        demo_family = DEMO_MODELS.get(self.path)
        if demo_family and self.family not in ("auto", demo_family):
            raise _rule(f"model.path {self.path} is the tiny {demo_family} model but model.family is "
                        f"{self.family}; set model.family to auto or use demo:{self.family}")
        return self


class DatasetSection(Section):
    path: str = Field("", description="Folder of images with caption files beside them.")
    caption_extension: str = Field(".txt", min_length=2, description="Extension of the caption files.")
    default_repeats: int = Field(1, ge=1, le=10000, description="Times each image is seen per epoch "
                                                                  "(a folder named like 10_name overrides it).")
    resolution: int = Field(512, ge=64, le=4096, multiple_of=64,
                            description="Training side length in pixels; buckets keep about this many pixels.")
    enable_buckets: bool = Field(True, description="Group images by aspect ratio instead of square-cropping.")
    min_bucket_side: int | None = Field(None, ge=64, le=8192,
                                        description="Smallest bucket side in pixels; empty = resolution / 2.")
    max_bucket_side: int | None = Field(None, ge=64, le=8192,
                                        description="Largest bucket side in pixels; empty = resolution x 2.")
    bucket_step: int = Field(64, ge=8, le=1024, multiple_of=8, description="Bucket sides are multiples of this.")
    bucket_no_upscale: bool = Field(False, description="Images smaller than resolution train at their own size "
                                                       "(sides cut to bucket_step multiples), never enlarged.")
    random_crop: bool = Field(False, description="Crop at a random place instead of the centre "
                                                 "(latents are then encoded every step, not cached).")
    flip: bool = Field(False, description="Randomly mirror images left-right; off for asymmetric subjects.")
    shuffle_captions: bool = Field(False, description="Shuffle comma-separated caption tags each step.")
    keep_tokens: int = Field(0, ge=0, le=255, description="Leading caption tags kept in place when shuffling "
                                                          "(1 keeps a trigger word first).")
    keep_tokens_separator: str = Field("", max_length=16, description=(
        "kohya's marker for a caption's fixed part, e.g. |||: 'trigger, look ||| shuffled tags ||| fixed end'. "
        "The separator is removed from the text; empty = keep_tokens decides."))
    caption_dropout: float = Field(0.0, ge=0, le=1, description="Chance of training an image with an empty caption.")
    caption_dropout_every_n_epochs: int = Field(0, ge=0, description="Every n-th epoch trains every image with "
                                                                     "an empty caption (kohya's); 0 = never.")
    tag_dropout: float = Field(0.0, ge=0, le=1, description="Chance of dropping each caption tag.")
    cache_latents: Literal["memory", "disk", "none"] = Field(
        "memory", description="Encode images with the VAE once and keep the latents in memory or on disk.")
    cache_text_encoder_outputs: bool = Field(
        True, description="Encode captions once; skipped when the text encoder trains or captions vary.")
    loss_mask: Literal["none", "alpha", "folder"] = Field(
        "none", description="Leave parts of images out of the loss: alpha uses each image's transparency, "
                            "folder uses grayscale masks (white = train) named like the images.")
    mask_folder: str | None = Field(None, description="Folder of masks for loss_mask = folder.")
    reg_path: str | None = Field(None, description=(
        "Folder of regularization images (kohya's reg_data_dir: pictures of the class, e.g. '1_person', made "
        "by the base model); they keep the class from drifting. Each epoch holds as many of them as training "
        "samples."))
    num_workers: int = Field(0, ge=0, le=64, description="Worker processes that decode the next batches' "
                                                         "images while a step runs, when images are encoded every "
                                                         "step (cache_latents = none, or random_crop); 0 loads "
                                                         "them in the training process.")

    @field_validator("caption_extension", mode="before")
    @classmethod
    def _leading_dot(cls, ext: Any) -> Any:
        return "." + ext if isinstance(ext, str) and ext and not ext.startswith(".") else ext

    @property
    def resolved_min_bucket_side(self) -> int:
        if self.min_bucket_side is not None:
            return self.min_bucket_side
        return max(self.bucket_step, self.resolution // 2 // self.bucket_step * self.bucket_step)

    @property
    def resolved_max_bucket_side(self) -> int:
        return self.max_bucket_side if self.max_bucket_side is not None else self.resolution * 2

    @model_validator(mode="after")
    def _buckets_fit(self) -> DatasetSection:
        # The same rules trainer/buckets.py enforces, checked here so the message names the keys at once.
        step, res = self.bucket_step, self.resolution
        if res % step:
            raise _rule(f"dataset.resolution ({res}) must be a multiple of dataset.bucket_step ({step})")
        for key in ("min_bucket_side", "max_bucket_side"):
            side = getattr(self, key)
            if side is not None and side % step:
                raise _rule(f"dataset.{key} ({side}) must be a multiple of dataset.bucket_step ({step})")
        low, high = self.resolved_min_bucket_side, self.resolved_max_bucket_side
        if self.enable_buckets and not step <= low <= res <= high:
            raise _rule(f"dataset.min_bucket_side ({low}) <= dataset.resolution ({res}) <= "
                        f"dataset.max_bucket_side ({high}) must hold; change the bucket sides or leave them empty")
        return self


class NetworkSection(Section):
    type: NetworkType = Field("lora", description="lora adapts attention and linear layers; locon also "
                                                  "adapts 3x3 convolutions; loha / lokr are LyCORIS's Hadamard / "
                                                  "Kronecker products (A1111, ComfyUI and LyCORIS load them, "
                                                  "diffusers does not).")
    rank: int = Field(16, ge=1, le=1024, description="Rank r: the adapter's capacity and file size.")
    alpha_ratio: float = Field(0.5, gt=0, description="alpha / r; the update is scaled by alpha / r, so "
                                                      "this stays meaningful when r changes.")
    alpha: float | None = Field(None, gt=0, description="Absolute alpha; overrides alpha_ratio when set.")
    include_convs: bool = Field(False, description="loha / lokr: also adapt the ResNet convolutions and samplers "
                                                   "at conv_rank, as locon does (LyCORIS's conv_dim).")
    factor: int = Field(-1, ge=-1, description="lokr: LyCORIS's factor; each weight side splits as a x b with a = "
                                               "factor where it divides, -1 = the most balanced split.")
    decompose_both: bool = Field(False, description="lokr: the small Kronecker half as a rank-r product too.")
    conv_rank: int = Field(8, ge=1, le=1024, description="Rank of the 3x3 convolution adapters (locon).")
    conv_alpha_ratio: float = Field(0.5, gt=0, description="conv alpha / conv rank (locon).")
    conv_alpha: float | None = Field(None, gt=0, description="Absolute conv alpha; overrides conv_alpha_ratio.")
    dropout: float = Field(0.0, ge=0, le=1, description="Dropout on the adapter's hidden features.")
    rank_dropout: float = Field(0.0, ge=0, le=1, description="Chance of dropping each rank component per step.")
    module_dropout: float = Field(0.0, ge=0, le=1, description="Chance of skipping a whole adapter per step.")
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

    @property
    def resolved_alpha(self) -> float:
        return self.alpha if self.alpha is not None else self.alpha_ratio * self.rank

    @property
    def adapts_convs(self) -> bool:
        """Whether the 3x3 convs get adapters (at conv_rank): locon, or loha / lokr with include_convs."""
        return self.type == "locon" or self.include_convs

    @property
    def resolved_conv_alpha(self) -> float:
        return self.conv_alpha if self.conv_alpha is not None else self.conv_alpha_ratio * self.conv_rank

    @model_validator(mode="after")
    def _block_settings_read(self) -> NetworkSection:
        try:
            for sdxl in (False, True):  # the syntax, for either block count; the family is known only at load
                block_weights(sdxl, self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight)
            for key in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
                parse_block_values(getattr(self, key), f"network.{key}", whole=key.endswith("dims"))
        except SdloraError as error:
            raise _rule(str(error).rstrip(".")) from None
        return self

    @model_validator(mode="after")
    def _trains_something(self) -> NetworkSection:
        if not (self.train_unet or self.train_text_encoder):
            raise _rule("network.train_unet and network.train_text_encoder are both false; enable at least one")
        if self.type in ("loha", "lokr") and self.init != "kaiming":
            raise _rule(f"network.init {self.init} is for lora and locon; {self.type} starts as LyCORIS starts it, "
                        "so leave network.init at kaiming")
        if self.factor == 0:
            raise _rule("network.factor must be -1 (the balanced split) or an integer >= 1")
        if self.weights and self.init in ("pissa", "loraga"):
            raise _rule(f"network.weights continues a LoRA file, but network.init {self.init} would start from the "
                        "base weight instead; use network.init kaiming or gaussian")
        return self


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
    max_grad_norm: float = Field(1.0, ge=0, description="Clip gradients to this norm; 0 disables clipping.")
    prior_loss_weight: float = Field(1.0, ge=0, description="Loss weight of regularization images "
                                                             "(dataset.reg_path) against training images.")
    scale_weight_norms: float = Field(0.0, ge=0, description=(
        "kohya's max-norm regularization: after each step, modules whose change (scale x up x down) has a norm "
        "above this are scaled back to it (1 is usual); keeps a LoRA from overcooking. 0 = off."))
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Compute precision on GPU; bf16 needs an Ampere or newer card.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (slower).")
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
    scale_v_pred_loss_like_noise_pred: bool = Field(False, description=(
        "v-prediction models: weight the loss by SNR/(SNR+1) so it behaves like an epsilon model's (kohya's)."))
    v_pred_like_loss: float = Field(0.0, ge=0, description="Add this much of a v-prediction-like loss (kohya's; "
                                                           "about 0.1); 0 = off.")
    debiased_estimation: bool = Field(False, description="Weight the loss by 1/sqrt(SNR) (debiased "
                                                         "estimation, kohya's debiased_estimation_loss).")
    loss_type: Literal["l2", "huber", "smooth_l1"] = Field(
        "l2", description="l2 (mean squared error), or kohya's pseudo-Huber / smooth L1, which outlier "
                          "pixels pull on less.")
    huber_c: float = Field(0.1, gt=0, le=1, description="Huber parameter: the error size where the loss turns "
                                                        "from quadratic to linear.")
    huber_schedule: Literal["snr", "exponential", "constant"] = Field(
        "snr", description="How huber_c varies with the timestep (kohya's default: snr).")
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting gamma (5 is "
                                                                "typical); empty disables.")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Random seed for shuffling, noise and dropout.")


class SamplePrompt(Section):
    prompt: str = Field(description="What to draw.")
    negative_prompt: str = Field("", description="What to avoid.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed, fixed so samples are comparable over time.")
    cfg: float = Field(7.0, ge=0, le=50, description="Classifier-free guidance scale.")
    steps: int = Field(20, ge=1, le=500, description="Sampler steps.")
    width: int | None = Field(None, ge=64, le=4096, multiple_of=8,
                              description="Width in pixels; empty = dataset.resolution.")
    height: int | None = Field(None, ge=64, le=4096, multiple_of=8,
                               description="Height in pixels; empty = dataset.resolution.")


def _prompt_from_line(line: str) -> dict:
    try:
        prompt, ignored = parse_prompt_line(line, repr(line.strip()))
    except SdloraError as error:
        raise PydanticCustomError("sdlora_value", str(error).rstrip(".").replace("{", "(").replace("}", ")")) \
            from None
    if ignored:
        raise PydanticCustomError("sdlora_value", f"uses --{ignored[0]}, which sdlora does not support "
                                                  f"(options: {OPTION_HELP})")
    return prompt


class SampleSection(Section):
    every_steps: int = Field(0, ge=0, description="Draw samples every N steps; 0 disables.")
    every_epochs: int = Field(0, ge=0, description="Draw samples every N epochs; 0 disables.")
    at_start: bool = Field(False, description="Also draw them before the first step (the base model's "
                                              "images, to compare the LoRA's with).")
    prompts: list[SamplePrompt] = Field(default_factory=list, description="Prompts drawn at each sampling.")
    sampler: Sampler = Field("euler_a", description="Sampling method for previews.")

    @field_validator("prompts", mode="before")
    @classmethod
    def _plain_strings(cls, prompts: Any) -> Any:
        # `prompts = ["a cat", "a dog --w 512 --d 3"]` is the short form of a list of {prompt = ...} tables,
        # with kohya's inline options (trainer.sample_prompts).
        if isinstance(prompts, list):
            return [_prompt_from_line(p) if isinstance(p, str) else p for p in prompts]
        return prompts


class SaveSection(Section):
    every_steps: int = Field(0, ge=0, description="Save a checkpoint every N steps; 0 disables.")
    every_epochs: int = Field(1, ge=0, description="Save a checkpoint every N epochs; 0 disables.")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted.")
    precision: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="Weight precision of saved files.")
    metadata: Literal["full", "minimal"] = Field(
        "full", description="full records training settings and tag counts in the file; minimal only "
                            "what loaders need.")


class OutputSection(Section):
    dir: str = Field("", description="Run folder: config, events, samples, checkpoints and the final file.")
    tensorboard: bool = Field(False, description="Also write TensorBoard logs to the run folder.")


class ValidationSection(Section):
    images: int = Field(0, ge=0, description="Hold out this many training images to measure validation loss.")
    folder: str | None = Field(None, description="A separate folder of validation images instead.")
    every_steps: int = Field(0, ge=0, description="Measure validation loss every N steps; 0 disables.")
    seed: int = Field(1234, ge=0, le=SEED_MAX, description="Seed for validation noise, fixed so losses compare.")
    timesteps: list[Annotated[int, Field(ge=0, le=999)]] | None = Field(
        None, description="Timesteps at which the loss is measured; empty = an even spread.")

    @model_validator(mode="after")
    def _one_source(self) -> ValidationSection:
        if self.images and self.folder:
            raise _rule("validation.images and validation.folder are both set; use one of them")
        return self


# A run's name becomes a file name on Windows, macOS and Linux alike, and a word in prompts like
# <lora:NAME:1>, so only unambiguous characters are allowed.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class EmaSection(Section):
    enabled: bool = Field(False, description="Also export an average of recent weights as NAME-ema.safetensors.")
    decay: float = Field(0.999, gt=0, lt=1, description="Weight of the previous average at each step.")
    warmup: bool = Field(True, description="Ramp the decay up from 0 (diffusers' EMA schedule).")


class TrainConfig(Section):
    name: str = Field("my-lora", description="Name of the exported file (NAME.safetensors).")
    model: ModelSection = Field(default_factory=ModelSection, description="The base model.")
    dataset: DatasetSection = Field(default_factory=DatasetSection, description="Images, captions, buckets.")
    network: NetworkSection = Field(default_factory=NetworkSection, description="The adapter: type, rank, alpha.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimizer, schedule, precision.")
    sample: SampleSection = Field(default_factory=SampleSection, description="Preview images during training.")
    save: SaveSection = Field(default_factory=SaveSection, description="Checkpoints and the exported file.")
    output: OutputSection = Field(default_factory=OutputSection, description="Where the run is written.")
    validation: ValidationSection = Field(default_factory=ValidationSection, description="Validation loss.")
    ema: EmaSection = Field(default_factory=EmaSection, description="Exponential moving average of the weights.")

    @model_validator(mode="after")
    def _prodigy_takes_one_rate(self) -> TrainConfig:
        """prodigyopt refuses parameter groups at different non-zero learning rates (at its first step)."""
        train, net = self.train, self.network
        if train.optimizer != "prodigy":
            return self
        if train.loraplus_ratio != 1:
            raise _rule("train.optimizer prodigy needs one learning rate for every parameter, so "
                        "train.loraplus_ratio must be 1")
        rates = {train.unet_lr or train.learning_rate} if net.train_unet else set()
        if net.train_text_encoder:
            rates.add(train.text_encoder_lr or train.learning_rate)
        if len(rates) > 1:
            raise _rule("train.optimizer prodigy needs one learning rate for every parameter, so leave "
                        "train.unet_lr and train.text_encoder_lr empty or equal")
        weights = {w for sdxl in (False, True) for w in block_weights(
            sdxl, net.down_lr_weight, net.mid_lr_weight, net.up_lr_weight, net.block_lr_zero_threshold) or []}
        if weights - {0.0, 1.0}:
            raise _rule("train.optimizer prodigy needs one learning rate for every parameter, so block "
                        "learning-rate weights can only be 0 or 1")
        return self

    @model_validator(mode="after")
    def _timestep_range(self) -> TrainConfig:
        if self.train.min_timestep >= self.train.max_timestep:
            raise _rule(f"train.min_timestep ({self.train.min_timestep}) must be below train.max_timestep "
                        f"({self.train.max_timestep})")
        return self

    @model_validator(mode="after")
    def _max_norm_needs_a_zero_start(self) -> TrainConfig:
        if self.train.scale_weight_norms and self.network.init in ("pissa", "loraga"):
            raise _rule(f"train.scale_weight_norms works on a LoRA that starts at zero, but network.init is "
                        f"{self.network.init} (it starts from the base weight); use network.init kaiming or gaussian, "
                        "or set train.scale_weight_norms to 0")
        return self

    @field_validator("name")
    @classmethod
    def _safe_file_name(cls, name: str) -> str:
        if not _SAFE_NAME.fullmatch(name) or name.endswith("."):
            raise PydanticCustomError(
                "sdlora_value", "must be a file name of letters, digits, '-', '_' and '.', starting with a "
                                "letter or digit, at most 100 characters")
        return name

    def sample_size(self, prompt: SamplePrompt) -> tuple[int, int]:
        """(width, height) of a sample prompt, defaulting to the training resolution."""
        side = self.dataset.resolution
        return (prompt.width or side, prompt.height or side)


# --------------------------------------------------------------------------- reading and writing

def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and validate a TOML config file (a full config or a partial one over the defaults)."""
    return config_from_dict(read_toml(path), source=str(path))


def read_toml(path: str | os.PathLike) -> dict:
    """A TOML file as a dict; a missing file or a syntax error becomes one sentence naming the file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SdloraError(f"Config file {path} does not exist; check the path.") from None
    except UnicodeDecodeError:
        raise SdloraError(f"Config file {path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as exc:
        raise SdloraError(f"Cannot read config file {path} ({exc.strerror}); check the path.") from None
    return parse_toml(text, source=str(path))


def parse_toml(text: str, source: str = "the config") -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SdloraError(_toml_error_sentence(str(exc), source)) from None


def _toml_error_sentence(message: str, source: str) -> str:
    where = re.search(r"\(at line (\d+), column (\d+)\)", message)
    reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", message).rstrip(".")
    reason = reason[:1].lower() + reason[1:]
    place = f" at line {where.group(1)}, column {where.group(2)}" if where else ""
    if "(at end of document)" in message:
        place = " at the end of the file"
    return f"Invalid TOML in {source}{place}: {reason}; fix the syntax there."


def config_from_dict(data: Mapping[str, Any], source: str | None = None) -> TrainConfig:
    """Validate a (partial) config dict; `source` (a file name) is named in error messages."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"The config{_in(source)} must be a table of settings (got {_show(data)}).", "", source)
    try:
        return TrainConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise config_error(exc, source) from None


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain dict of every key, without the unset optional ones (TOML has no null)."""
    # mode="python" keeps inf as a float; mode="json" would turn it into null.
    return cfg.model_dump(mode="python", exclude_none=True)


def dump_config(cfg: TrainConfig) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the full config as TOML, atomically, so a crash never leaves half a file."""
    return write_text_atomic(path, dump_config(cfg))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a file through a temporary file and a rename; disk errors become one sentence."""
    # Not networks.lora_file.atomic_write: that module imports torch, and config must load fast for the CLI.
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False) as tmp:
            tmp_name = tmp.name
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        if tmp_name:
            Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise SdloraError(f"Cannot write {path} ({exc.strerror}); check that the folder is writable and "
                              f"the disk has space.") from None
        raise
    return path


def merge_dicts(base: Mapping[str, Any], partial: Mapping[str, Any]) -> dict:
    """`base` with `partial` laid over it: tables merge key by key, anything else is replaced."""
    merged = {key: _copy(value) for key, value in base.items()}
    for key, value in partial.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = _copy(value)
    return merged


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# --------------------------------------------------------------------------- --set KEY=VALUE

def apply_overrides(cfg_or_dict: TrainConfig | Mapping[str, Any], overrides: Iterable[str],
                    source: str | None = None) -> TrainConfig:
    """Apply "dotted.key=value" overrides and validate.

    Values are TOML literals when they parse as one (2e-4, true, [1, 2], "quoted"), else plain text, so
    `model.path=/x/y` works; text fields always take the text as is, and `none` clears an optional key.
    """
    data = config_to_dict(cfg_or_dict) if isinstance(cfg_or_dict, TrainConfig) else _copy(dict(cfg_or_dict))
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(data, key, _parse_value(key, value), item)
    return config_from_dict(data, source=source)


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
        raise SdloraError(f"Override {item!r} must look like KEY=VALUE, e.g. train.learning_rate=2e-4.")
    return key, value.strip()


def _parse_value(key: str, text: str) -> Any:
    annotation = _annotation_at(key.split("."))
    optional = annotation is not None and _is_optional(annotation)
    if optional and text.lower() in ("none", "null"):
        return None
    quoted = text[:1] in ('"', "'")
    if annotation is not None and _wants_text(annotation) and not quoted:
        return text
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(data: dict, key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: depth + 1]), item)
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key, item)] = value
    else:
        node[last] = value


def _child(node: dict | list, part: str, path: str, item: str) -> dict | list:
    if isinstance(node, list):
        child = node[_list_index(node, part, path, item)]
    else:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
    if not isinstance(child, (dict, list)):
        raise SdloraError(f"Override {item!r}: {path} is a single value, not a section; check the key.")
    return child


def _list_index(node: list, part: str, path: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise SdloraError(f"Override {item!r}: {path} needs an index from 0 to {len(node) - 1}.")
    return int(part)


# --------------------------------------------------------------------------- the field table for the UI

class ConfigField(NamedTuple):
    key: str                       # dotted path, e.g. "network.rank"
    type: str                      # e.g. "int", "float | None", "choice", "list[SamplePrompt]"
    default: Any
    description: str
    choices: tuple | None          # the allowed values of a choice field
    bounds: dict[str, float]       # any of ge, gt, le, lt, multiple_of


def config_field_table(model_cls: type[BaseModel] = TrainConfig, prefix: str = "") -> list[ConfigField]:
    """Every leaf key of a config model, in declaration order (sections are walked into)."""
    rows = []
    for name, field in model_cls.model_fields.items():
        key = prefix + name
        if _is_model(field.annotation):
            rows.extend(config_field_table(field.annotation, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append(ConfigField(key, _type_name(field.annotation), default, field.description or "",
                                _choices(field.annotation), _bounds(field.metadata)))
    return rows


def config_keys(model_cls: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key, sections and leaves, with list items' keys as e.g. sample.prompts.seed."""
    keys = []
    for name, field in model_cls.model_fields.items():
        key = prefix + name
        keys.append(key)
        inner = _item_model(field.annotation)
        if inner is not None:
            keys.extend(config_keys(inner, key + "."))
    return keys


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "choice"
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _choices(tp: Any) -> tuple | None:
    for arm in _arms(tp):
        if get_origin(arm) is Literal:
            return get_args(arm)
    return None


def _bounds(metadata: Sequence[Any]) -> dict[str, float]:
    # Field(ge=1) is stored as annotated_types.Ge(ge=1) in the field's metadata, and so on.
    bounds = {}
    for item in metadata:
        for name in ("ge", "gt", "le", "lt", "multiple_of"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    return bounds


def _arms(tp: Any) -> tuple:
    """The alternatives of a union (or the type alone), without None."""
    if get_origin(tp) in (Union, types.UnionType):
        return tuple(a for a in get_args(tp) if a is not type(None))
    return (tp,)


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _item_model(tp: Any) -> type[BaseModel] | None:
    """The model inside a section or a list of models, else None."""
    for arm in _arms(tp):
        if _is_model(arm):
            return arm
        if get_origin(arm) is list and _is_model(get_args(arm)[0]):
            return get_args(arm)[0]
    return None


def _wants_text(tp: Any) -> bool:
    arms = _arms(tp)
    literal_text = all(get_origin(a) is Literal and all(isinstance(v, str) for v in get_args(a)) for a in arms)
    return arms == (str,) or literal_text


def _annotation_at(parts: Sequence[str | int]) -> Any:
    """The annotation of the key at `parts` (names; list indices as ints or digit strings), or None."""
    tp: Any = TrainConfig
    for part in parts:
        inner = _unwrap(tp)
        if _is_model(inner):
            field = inner.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif get_origin(inner) is list and str(part).isdigit():
            tp = get_args(inner)[0]
        elif get_origin(inner) is dict and isinstance(part, str):
            tp = get_args(inner)[1]
        else:
            return None  # past a leaf, or a union's branch tag in a pydantic loc
    return tp if parts else None


def _unwrap(tp: Any) -> Any:
    """int for Annotated[int, ...] and for int | None; a union of several types stays as it is."""
    if get_origin(tp) is Annotated:
        return _unwrap(get_args(tp)[0])
    arms = _arms(tp)
    return _unwrap(arms[0]) if len(arms) == 1 and arms[0] is not tp else tp


# --------------------------------------------------------------------------- one-sentence errors

def config_error(exc: ValidationError, source: str | None = None) -> ConfigError:
    """The first problem of a pydantic ValidationError as one user-facing sentence."""
    errors = exc.errors(include_url=False)
    # A misspelt key explains the other errors (e.g. a "required" one), so it is reported first.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    kind = err["type"]
    loc = _field_loc(err["loc"], kind)
    key = _dotted(loc)
    if kind == "sdlora_rule":
        message = f"In {source}, {err['msg']}." if source else f"{err['msg']}."
        return ConfigError(message, key, source)
    if kind == "extra_forbidden":
        return ConfigError(_unknown_key_sentence(loc, key, source), key, source)
    return ConfigError(f"{key}{_in(source)} {_value_problem(err, loc)}.", key, source)


def _field_loc(loc: Sequence[str | int], kind: str) -> tuple:
    """The loc without pydantic's union-branch tags (e.g. the 'float' in train.optimizer_args.betas.float)."""
    if kind == "extra_forbidden":
        return tuple(loc)  # ends in the unknown key, which has no annotation by definition
    for end in range(len(loc), 0, -1):
        if _annotation_at(loc[:end]) is not None:
            return tuple(loc[:end])
    return tuple(loc)


def _dotted(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _in(source: str | None) -> str:
    return f" in {source}" if source else ""


def _unknown_key_sentence(loc: tuple, key: str, source: str | None) -> str:
    suggestion = _closest_key(loc)
    hint = f"did you mean {suggestion!r}?" if suggestion else "remove it or check the spelling."
    return f"Unknown config key {key!r}{_in(source)}; {hint}"


# kohya_ss and common short names, so a user coming from there is pointed at our key.
_KNOWN_ALIASES = {
    "lr": "train.learning_rate", "network_dim": "network.rank", "dim": "network.rank",
    "network_alpha": "network.alpha", "conv_dim": "network.conv_rank", "network_dropout": "network.dropout",
    "train_batch_size": "train.batch_size", "max_train_steps": "train.max_steps",
    "max_train_epochs": "train.epochs", "optimizer_type": "train.optimizer",
    "optimizer_args": "train.optimizer_args", "save_every_n_epochs": "save.every_epochs",
    "save_every_n_steps": "save.every_steps", "save_precision": "save.precision", "output_name": "name",
    "output_dir": "output.dir", "train_data_dir": "dataset.path",
    "pretrained_model_name_or_path": "model.path", "shuffle_caption": "dataset.shuffle_captions",
    "flip_aug": "dataset.flip", "enable_bucket": "dataset.enable_buckets",
    "min_bucket_reso": "dataset.min_bucket_side", "max_bucket_reso": "dataset.max_bucket_side",
    "bucket_reso_steps": "dataset.bucket_step", "bucket_no_upscale": "dataset.bucket_no_upscale",
    "sample_every_n_steps": "sample.every_steps", "clip_skip": "model.clip_skip",
    "multires_noise_iterations": "train.multires_noise_iterations",
    "multires_noise_discount": "train.multires_noise_discount", "ip_noise_gamma": "train.ip_noise_gamma",
    "debiased_estimation_loss": "train.debiased_estimation", "loss_type": "train.loss_type",
    "huber_c": "train.huber_c", "huber_schedule": "train.huber_schedule",
    "sample_every_n_epochs": "sample.every_epochs", "sample_sampler": "sample.sampler",
    "sample_at_first": "sample.at_start",
    "caption_dropout_rate": "dataset.caption_dropout", "caption_tag_dropout_rate": "dataset.tag_dropout",
    "max_data_loader_n_workers": "dataset.num_workers", "v_parameterization": "model.prediction_type",
    "steps": "train.max_steps", "batch": "train.batch_size",
}


def _closest_key(loc: tuple) -> str | None:
    names = [str(p) for p in loc if not isinstance(p, int)]
    wanted, leaf = ".".join(names), names[-1]
    keys = config_keys()
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]  # the right key in the wrong section
    if leaf in _KNOWN_ALIASES:
        return _KNOWN_ALIASES[leaf]
    # Compare with keys as deep as the unknown one first, so train.lrate finds a key, not the section.
    depth = wanted.count(".")
    match = (difflib.get_close_matches(wanted, [k for k in keys if k.count(".") == depth], n=1, cutoff=0.6)
             or difflib.get_close_matches(wanted, keys, n=1, cutoff=0.6))
    if not match:
        return None
    parent = wanted.rpartition(".")[0]
    if match[0].rpartition(".")[0] == parent:
        # Keep the user's list index, e.g. sample.prompts[0].promt -> sample.prompts[0].prompt.
        return _dotted(loc[:-1] + (match[0].rsplit(".", 1)[-1],))
    return match[0]


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text in quotes"}
_LIMITS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def _value_problem(err: dict, loc: tuple) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, f" (got {_show(err['input'])})"
    annotation = _annotation_at(loc)
    word = _type_word(annotation)
    if kind == "missing":
        return "is required"
    if annotation is not None and len(_arms(annotation)) > 1 and not _choices(annotation):
        return f"must be {word}{got}"  # a union: every arm failed, so name them all
    if kind in _LIMITS:
        name, sign = _LIMITS[kind]
        return f"must be {word} {sign} {_number(ctx[name])}{got}"
    if kind == "multiple_of":
        return f"must be a multiple of {ctx['multiple_of']}{got}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}{got}"
    if kind == "sdlora_value":
        return f"{err['msg']}{got}"
    if kind in ("string_too_short", "string_too_long"):
        return f"{err['msg'].lower()}{got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a table of settings{got}"
    if kind == "list_type":
        return f"must be a list{got}"
    return f"must be {word}{got}"


def _type_word(annotation: Any) -> str:
    if annotation is None:
        return "a valid value"
    arms = _arms(_unwrap(annotation))
    words = [_WORDS.get(a, "a list of numbers" if get_origin(a) is list else "a valid value") for a in arms]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _number(value: float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
