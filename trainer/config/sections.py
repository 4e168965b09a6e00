"""The config sections: every key a user can set, with its bounds and a short description; `TrainConfig`
holds them all. The enumerations are written once, here or in networks/spec.py."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from networks.block_lr import block_weights, parse_block_values
from networks.errors import SdloraError
from networks.spec import FAMILIES, LYCORIS_TYPES, NetworkInit, NetworkSpec, NetworkType
from trainer.config.sample_prompts import OPTION_HELP, parse_prompt_line
from trainer.data.buckets import BucketSpec
from trainer.data.captions import CaptionOptions
from trainer.data.dataset import DatasetOptions

# Each enumeration is written once, here or in networks/spec.py, and read everywhere else.
Family = Literal[("auto", *FAMILIES)]


PREDICTION_TYPES = ("epsilon", "v_prediction")


PredictionType = Literal[("auto", *PREDICTION_TYPES)]


LossType = Literal["l2", "huber", "smooth_l1"]


LOSS_TYPES: tuple[str, ...] = get_args(LossType)


Optimizer = Literal["adamw", "adamw8bit", "lion", "prodigy", "adafactor"]


# The names diffusers.optimization.get_scheduler accepts, so the loop can pass the value straight through.
LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


Sampler = Literal["euler_a", "euler", "ddim", "dpmpp_2m"]
MixedPrecision = Literal["no", "fp16", "bf16"]


# Built-in models and their family: demo:shapes was pretrained to draw (docs/DEMO_MODEL.md); the other
# three have random weights and exist so every family's layout can be tried and tested in seconds.
DEMO_MODELS = {"demo:shapes": "sd1", "demo:sd1": "sd1", "demo:sd2": "sd2", "demo:sdxl": "sdxl"}


SEED_MAX = 2**32 - 1  # numpy's limit; torch accepts more, but a seed must work everywhere


OptimizerArg = float | int | bool | str | list[float]


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

    def buckets(self) -> BucketSpec:
        return BucketSpec(resolution=self.resolution, step=self.bucket_step, min_side=self.min_bucket_side,
                          max_side=self.max_bucket_side, enabled=self.enable_buckets,
                          no_upscale=self.bucket_no_upscale)

    def options(self) -> DatasetOptions:
        """What the dataset reads: the trainer, the pre-flight report and the Dataset tab all build it here."""
        captions = CaptionOptions(shuffle_tags=self.shuffle_captions, keep_tokens=self.keep_tokens,
                                  caption_dropout=self.caption_dropout, tag_dropout=self.tag_dropout,
                                  keep_tokens_separator=self.keep_tokens_separator,
                                  dropout_every_n_epochs=self.caption_dropout_every_n_epochs)
        return DatasetOptions(folder=Path(self.path), buckets=self.buckets(), captions=captions,
                              caption_extension=self.caption_extension, default_repeats=self.default_repeats,
                              random_crop=self.random_crop, flip=self.flip,
                              reg_folder=Path(self.reg_path) if self.reg_path else None)

    @property
    def resolved_min_bucket_side(self) -> int:
        return self.buckets().smallest

    @property
    def resolved_max_bucket_side(self) -> int:
        return self.buckets().largest

    @model_validator(mode="after")
    def _buckets_fit(self) -> DatasetSection:
        # The same rules trainer/data/buckets.py enforces, checked here so the message names the keys at once.
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
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's hidden features.")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Chance of dropping each rank component per step.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Chance of skipping a whole adapter per step.")
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
            raise _rule(str(error).rstrip(".")) from None
        return self

    @model_validator(mode="after")
    def _trains_something(self) -> NetworkSection:
        if not (self.train_unet or self.train_text_encoder):
            raise _rule("network.train_unet and network.train_text_encoder are both false; enable at least one")
        if self.type in LYCORIS_TYPES and self.init != "kaiming":
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
    mixed_precision: MixedPrecision = Field(
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
        # with kohya's inline options (trainer.config.sample_prompts).
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
