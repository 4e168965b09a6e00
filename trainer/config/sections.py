"""The config sections: every key a user can set, with its bounds and a short description; `TrainConfig`
holds them all. This module holds the model, dataset and output sections and the whole; `[network]` and
`[train]` have modules of their own, the enumerations are in choices.py (and networks/spec.py), and every
name stays importable from here."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from networks.block_lr import block_weights
from networks.errors import SdloraError
from trainer.config.choices import DEMO_MODELS, SEED_MAX, Family, PredictionType, Sampler
from trainer.config.network_section import NetworkSection
from trainer.config.sample_prompts import OPTION_HELP, parse_prompt_line
from trainer.config.section import Section, rule
from trainer.config.train_section import TrainSection
from trainer.data.buckets import BucketSpec
from trainer.data.captions import CaptionOptions
from trainer.data.dataset import DatasetOptions

__all__ = [
    "DatasetSection", "EmaSection", "ModelSection", "NetworkSection", "OutputSection", "SamplePrompt", "SampleSection",
    "SaveSection", "Section", "TrainConfig", "TrainSection", "ValidationSection",
]


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
    fp8_base: bool = Field(False, description="Store the frozen UNet (and the text encoders when they are not "
                                              "trained) in float8_e4m3fn, about half the weight memory of "
                                              "fp16, each layer computing in the run's precision; the adapters "
                                              "stay full precision (kohya's fp8_base).")

    @property
    def prompt_chunks(self) -> int:
        """75-token windows per prompt."""
        return self.max_token_length // 75

    @field_validator("path")
    @classmethod
    def _known_demo(cls, path: str) -> str:
        if not path.strip():  # a blank path would be read as the current folder
            raise PydanticCustomError("sdlora_value", "is empty; give a diffusers folder, a .safetensors/.ckpt "
                                                      "file or demo:shapes")
        if path.startswith("demo:") and path not in DEMO_MODELS:
            raise PydanticCustomError("sdlora_value", "must be one of " + ", ".join(DEMO_MODELS))
        return path

    @model_validator(mode="after")
    def _demo_matches_family(self) -> ModelSection:
        demo_family = DEMO_MODELS.get(self.path)
        if demo_family and self.family not in ("auto", demo_family):
            raise rule(f"model.path {self.path} is the tiny {demo_family} model but model.family is "
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

    @field_validator("path")
    @classmethod
    def _not_blank(cls, path: str) -> str:
        # "" means not given yet (--data gives it); spaces alone would be read as the current folder.
        if path and not path.strip():
            raise PydanticCustomError("sdlora_value", "is only spaces; give the folder of images")
        return path

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
            raise rule(f"dataset.resolution ({res}) must be a multiple of dataset.bucket_step ({step})")
        for key in ("min_bucket_side", "max_bucket_side"):
            side = getattr(self, key)
            if side is not None and side % step:
                raise rule(f"dataset.{key} ({side}) must be a multiple of dataset.bucket_step ({step})")
        low, high = self.resolved_min_bucket_side, self.resolved_max_bucket_side
        if self.enable_buckets and not step <= low <= res <= high:
            raise rule(f"dataset.min_bucket_side ({low}) <= dataset.resolution ({res}) <= "
                       f"dataset.max_bucket_side ({high}) must hold; change the bucket sides or leave them empty")
        return self


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
            raise rule("validation.images and validation.folder are both set; use one of them")
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
            raise rule("train.optimizer prodigy needs one learning rate for every parameter, so "
                       "train.loraplus_ratio must be 1")
        rates = {train.unet_lr or train.learning_rate} if net.train_unet else set()
        if net.train_text_encoder:
            rates.add(train.text_encoder_lr or train.learning_rate)
        if len(rates) > 1:
            raise rule("train.optimizer prodigy needs one learning rate for every parameter, so leave "
                       "train.unet_lr and train.text_encoder_lr empty or equal")
        weights = {w for sdxl in (False, True) for w in block_weights(
            sdxl, net.down_lr_weight, net.mid_lr_weight, net.up_lr_weight, net.block_lr_zero_threshold) or []}
        if weights - {0.0, 1.0}:
            raise rule("train.optimizer prodigy needs one learning rate for every parameter, so block "
                       "learning-rate weights can only be 0 or 1")
        return self

    @model_validator(mode="after")
    def _timestep_range(self) -> TrainConfig:
        if self.train.min_timestep >= self.train.max_timestep:
            raise rule(f"train.min_timestep ({self.train.min_timestep}) must be below train.max_timestep "
                       f"({self.train.max_timestep})")
        return self

    @model_validator(mode="after")
    def _max_norm_needs_a_zero_start(self) -> TrainConfig:
        if self.train.scale_weight_norms and self.network.init in ("pissa", "loraga"):
            raise rule(f"train.scale_weight_norms works on a LoRA that starts at zero, but network.init is "
                       f"{self.network.init} (it starts from the base weight); use network.init kaiming or gaussian, "
                       "or set train.scale_weight_norms to 0")
        return self

    @model_validator(mode="after")
    def _fp8_base_keeps_the_base(self) -> TrainConfig:
        if self.model.fp8_base and self.network.init in ("pissa", "loraga"):
            raise rule(f"model.fp8_base stores the base weights in 8 bits, but network.init {self.network.init} "
                       "moves them; use network.init kaiming or gaussian, or set model.fp8_base to false")
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
