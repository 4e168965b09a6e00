"""Open a base model (demo:<family>, a diffusers folder, a hub id, or one .safetensors/.ckpt file) offline.

Single files are converted by diffusers' own single-file loaders; the configs they need come from the
folders shipped under trainer/assets/configs (the real SD1.5, SD2.1, SD2.1-base and SDXL-base configs), so
nothing is looked up on the hub. What the model is (family, prediction type, which config) is asked of
trainer/model/facts.py, as the pre-flight asks it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors import SafetensorError
from safetensors.torch import load_file

from networks.errors import SdloraError
from trainer.model.checkpoint_parts import part_keys, read_safetensors_part, take_part
from trainer.model.facts import (
    SHIPPED_CONFIGS,
    ModelFacts,
    PartConfigs,
    check_checkpoint_file,
    checked_overrides,
    first_line,
    locate_model,
    model_facts,
    not_a_checkpoint,
    safetensors_keys,
    unreadable_checkpoint,
)
from trainer.model.family import ModelFamily, get_family
from trainer.model.tiny_models import demo_model_path, load_clip_tokenizer

# Pipeline parts a trainer never needs; not loading them saves time, memory and downloads.
_UNNEEDED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")
# Called with ("unet" | "vae" | "text_encoder", module) as soon as each part is built, e.g. to move it to the
# GPU before the next part is read, so host memory holds one part at a time.
Place = Callable[[str, torch.nn.Module], None]


def _keep(name: str, module: torch.nn.Module) -> None:
    """The default placement: the part stays where it was loaded (the CPU)."""


@dataclass
class LoadedModel:
    """Everything training needs from a base model, in the requested dtypes, where `place` put each part."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list
    tokenizers: list
    noise_scheduler: DDPMScheduler
    family: ModelFamily
    prediction_type: str
    source: str
    vae_identity: str
    scheduler_config: dict = field(default_factory=dict)  # the model's own (inference) scheduler

    def pipeline(self) -> DiffusionPipeline:
        """The diffusers pipeline over these very modules (for sample images), with the model's scheduler."""
        scheduler_class = getattr(diffusers, self.scheduler_config.get("_class_name", "DDIMScheduler"))
        scheduler = scheduler_class.from_config(self.scheduler_config, prediction_type=self.prediction_type)
        parts = dict(zip(self.family.text_encoder_attrs, self.text_encoders))
        parts.update(zip(self.family.tokenizer_attrs, self.tokenizers))
        pipeline_class = getattr(diffusers, self.family.pipeline_class_name)
        return pipeline_class(
            unet=self.unet, vae=self.vae, scheduler=scheduler, **parts, **self.family.pipeline_extras()
        )


def load_model(
    spec: str,
    family: str = "auto",
    prediction_type: str = "auto",
    dtype: torch.dtype = torch.float32,
    config_dir: str | Path | None = None,
    vae: str | Path | None = None,
    vae_dtype: torch.dtype | None = None,
    place: Place = _keep,
) -> LoadedModel:
    """Load `spec` with its weights in `dtype` (the VAE's in `vae_dtype`, default `dtype`), each read in that
    dtype rather than cast after; `config_dir` (a diffusers folder) replaces the shipped config for single
    files; `vae` (kohya's --vae: a VAE file or folder) replaces the model's own VAE; `place` gets each part
    as soon as it is built."""
    vae_dtype = vae_dtype or dtype
    model = _load_base(spec, family, prediction_type, (dtype, vae_dtype), config_dir, place)
    return with_vae(model, vae, vae_dtype, config_dir, place) if vae else model


def _load_base(spec, family, prediction_type, dtypes, config_dir, place: Place) -> LoadedModel:
    checked_overrides(family, prediction_type)  # before a large file is read
    location = locate_model(spec)
    if location.kind == "file":
        checkpoint = _Checkpoint.open(location.where)
        facts = model_facts(location, family, prediction_type, config_dir, keys=checkpoint.keys)
        return _load_single_file(checkpoint, facts, dtypes, place)
    return _load_pretrained(location, family, prediction_type, dtypes, place)


def check_model_spec(spec: str) -> None:
    """One sentence when `spec` can name no model at all (no such file or folder, not a hub id, a file that is no
    checkpoint); cheap, so it runs before anything is written."""
    locate_model(spec)


# --- diffusers folders and hub ids ------------------------------------------------------------------


def _fp16_only(folder: Path) -> bool:
    """Some hub folders ship only *.fp16.safetensors weights, which diffusers loads as variant="fp16"."""
    unet = folder / "unet"
    return unet.is_dir() and not any(unet.glob("diffusion_pytorch_model.*")) and any(unet.glob("*.fp16.*"))


def _load_pretrained(location, family, prediction_type: str, dtypes, place: Place) -> LoadedModel:
    where, source = location.where, location.spec
    facts = model_facts(location, family, prediction_type)  # a hub id's are known once it is downloaded
    kwargs = {}
    if isinstance(where, Path) and _fp16_only(where):
        kwargs["variant"] = "fp16"
    try:
        index = DiffusionPipeline.load_config(where)
        kwargs.update({part: None for part in _UNNEEDED_PARTS if part in index})
        dtype, vae_dtype = dtypes
        pipe = DiffusionPipeline.from_pretrained(where, dtype={"default": dtype, "vae": vae_dtype}, **kwargs)
    except (OSError, ValueError) as error:
        raise SdloraError(
            f"The model {source} could not be loaded ({first_line(error)}); check the path or hub id."
        ) from None
    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise SdloraError(
            f"The model {source} is a {type(pipe).__name__}, not Stable Diffusion 1.x, 2.x or XL."
        )
    if location.kind == "hub":
        facts = model_facts(location, family, prediction_type, configs=_pipeline_configs(pipe))
    family = get_family(facts.family)
    missing = [
        a for a in family.text_encoder_attrs + family.tokenizer_attrs if getattr(pipe, a, None) is None
    ]
    if missing:
        raise SdloraError(
            f"The model {source} has no {missing[0]}, so it is not an {family.name} model; set family to auto."
        )
    encoders = [getattr(pipe, a) for a in family.text_encoder_attrs]
    for name, module in (("unet", pipe.unet), ("vae", pipe.vae), *(("text_encoder", e) for e in encoders)):
        place(name, module)
    return _assemble(
        pipe.unet,
        pipe.vae,
        encoders,
        [getattr(pipe, a) for a in family.tokenizer_attrs],
        facts,
        str(where),
        dict(pipe.scheduler.config),
    )


def _pipeline_configs(pipe) -> PartConfigs:
    encoders = [getattr(pipe, a) for a in ("text_encoder", "text_encoder_2") if getattr(pipe, a, None) is not None]
    return PartConfigs(dict(pipe.unet.config), [e.config.to_dict() for e in encoders], dict(pipe.scheduler.config),
                       dict(pipe.vae.config))


# --- single original-layout checkpoints -------------------------------------------------------------


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a .safetensors or .ckpt file; pickles only through torch.load(weights_only=True)."""
    check_checkpoint_file(path)
    try:
        if path.suffix.lower() == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SdloraError(
            f"The checkpoint {path} holds Python objects that cannot be loaded safely; convert it to .safetensors first."
        ) from None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as error:
        raise unreadable_checkpoint(path, error) from None
    except (KeyError, IndexError, struct.error):  # a damaged pickle stream: torch.load's unpickler trips on it
        raise not_a_checkpoint(path) from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise SdloraError(
            f"The file {path} holds no model weights; use a Stable Diffusion .safetensors or .ckpt file."
        )
    return state


@dataclass
class _Checkpoint:
    """A single-file checkpoint whose parts are read one at a time, each in its dtype (checkpoint_parts.py)."""

    path: Path
    keys: list[str]
    state: dict | None = None  # a .ckpt's whole state dict; a .safetensors file is read part by part

    @classmethod
    def open(cls, path: Path) -> _Checkpoint:
        if path.suffix.lower() != ".safetensors":
            state = read_checkpoint(path)
            return cls(path, list(state), state)
        check_checkpoint_file(path)
        keys = safetensors_keys(path)  # safetensors itself checks the header
        if not keys:
            raise SdloraError(
                f"The file {path} holds no model weights; use a Stable Diffusion .safetensors or .ckpt file."
            )
        return cls(path, keys)

    def part(self, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        keys = part_keys(self.keys, name)
        try:
            if self.state is None:
                return read_safetensors_part(self.path, keys, dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise unreadable_checkpoint(self.path, error) from None
        return take_part(self.state, keys, dtype)


def text_encoder_classes(config_dir: Path, family: ModelFamily) -> list:
    index = json.loads((config_dir / "model_index.json").read_text())
    classes = []
    for attr in family.text_encoder_attrs:
        library, name = index[attr]
        classes.append(getattr(importlib.import_module(library), name))
    return classes


def _load_single_file(checkpoint: _Checkpoint, facts: ModelFacts, dtypes, place: Place) -> LoadedModel:
    path, config, family = facts.location.where, facts.config_folder, get_family(facts.family)
    common = dict(config=str(config), local_files_only=True)
    dtype, vae_dtype = dtypes

    def placed(name: str, module: torch.nn.Module) -> torch.nn.Module:
        _check_complete(module, name.replace("_", " "), path)  # before place: meta weights cannot move
        place(name, module)  # outside the conversion's error sentence: a GPU out of memory is no layout error
        return module

    # Part by part, each read in its own dtype: host memory holds one part's tensors beside the placed parts.
    unet = placed("unet", _converted(facts, UNet2DConditionModel.from_single_file,
                                     checkpoint.part("unet", dtype), subfolder="unet", dtype=dtype, **common))
    vae = placed("vae", _converted(facts, AutoencoderKL.from_single_file, checkpoint.part("vae", vae_dtype),
                                   subfolder="vae", dtype=vae_dtype, **common))
    state = checkpoint.part("text_encoders", dtype)
    built = [_converted(facts, create_diffusers_clip_model_from_ldm, cls, state, subfolder=attr, torch_dtype=dtype,
                        **common)
             for cls, attr in zip(text_encoder_classes(config, family), family.text_encoder_attrs)]
    encoders = [placed("text_encoder", encoder) for encoder in built]
    tokenizers = [load_clip_tokenizer(pad) for pad in family.tokenizer_pad_tokens]
    scheduler_config = dict(DDPMScheduler.load_config(str(config), subfolder="scheduler"))
    return _assemble(unet, vae, encoders, tokenizers, facts, str(path), scheduler_config)


def _converted(facts: ModelFacts, convert: Callable, *args, **kwargs):
    """diffusers' conversion of one part, its failure one sentence about the layout."""
    try:
        return convert(*args, **kwargs)
    except (
        ValueError,
        RuntimeError,
        KeyError,
        OSError,
        diffusers.loaders.single_file_utils.SingleFileComponentError,
    ) as error:
        raise SdloraError(
            f"The checkpoint {facts.location.where} does not fit the {facts.config_folder.name} model layout "
            f"({first_line(error)}); check the family setting or pass a matching config folder."
        ) from None


def with_vae(model: LoadedModel, spec: str | Path, dtype=torch.float32, config_dir=None,
             place: Place = _keep) -> LoadedModel:
    """`model` with another VAE: a diffusers folder (its own or a model's vae/), or a single file in the
    original layout (A1111's .safetensors/.ckpt/.pt VAEs, with or without the first_stage_model. prefix),
    read with the base model's VAE config."""
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise SdloraError(f"model.vae {path} is a folder without config.json; give a VAE .safetensors file or "
                              "a diffusers VAE folder.")
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    elif path.is_file():
        state = read_checkpoint(path)
        root = _vae_config_root(model, config_dir)
        try:
            vae = AutoencoderKL.from_single_file(state, config=str(root), subfolder="vae", dtype=dtype,
                                                 local_files_only=True)
        except (ValueError, RuntimeError, KeyError, OSError,
                diffusers.loaders.single_file_utils.SingleFileComponentError) as error:
            raise SdloraError(f"model.vae {path} does not fit this {model.family.name} model's VAE "
                              f"({first_line(error)}); choose a VAE made for {model.family.name}.") from None
        _check_complete(vae, "VAE", path)
    else:
        raise SdloraError(f"model.vae {spec} was not found; give a VAE .safetensors file or a diffusers VAE folder.")
    place("vae", vae)
    return replace(model, vae=vae, vae_identity=vae_identity(vae))


def _vae_config_root(model: LoadedModel, config_dir) -> Path:
    """Where the base model's VAE config lives: config_dir, the model's own folder, or the shipped one."""
    if config_dir:
        return Path(config_dir)
    source = demo_model_path(model.source.removeprefix("demo:")) if model.source.startswith("demo:") \
        else Path(model.source)
    if (source / "vae" / "config.json").is_file():
        return source
    return SHIPPED_CONFIGS / model.family.shipped_config_name(model.prediction_type)


def _check_complete(module: torch.nn.Module, name: str, path: Path) -> None:
    # Weights a checkpoint lacks stay on the "meta" device after diffusers' low-memory loading.
    missing = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if missing:
        raise SdloraError(
            f"The checkpoint {path} lacks {len(missing)} {name} weights (e.g. {missing[0]}); it is incomplete or of another model type."
        )


# --- shared ----------------------------------------------------------------------------------------


def vae_identity(vae: AutoencoderKL) -> str:
    """A stable id of what turns images into latents: the VAE config and statistics of encoder weights.

    Only the encoder side counts, so a decoder-only VAE fine-tune (e.g. ft-MSE) keeps latent caches valid.
    The same weights loaded in the same dtype always give the same id.
    """
    config = {k: v for k, v in vae.config.items() if not k.startswith("_") and k != "sample_size"}
    stats = []
    for name, tensor in vae.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.")):
            t = tensor.detach().to("cpu", torch.float64)
            stats.append([name, list(t.shape), f"{t.sum().item():.10g}", f"{t.abs().sum().item():.10g}"])
    text = json.dumps([config, stats], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _assemble(unet, vae, encoders, tokenizers, facts: ModelFacts, source: str, scheduler_config: dict) -> LoadedModel:
    # Training noise always follows DDPM with the model's betas; clip_sample only matters when sampling.
    noise_scheduler = DDPMScheduler.from_config(
        scheduler_config, prediction_type=facts.prediction_type, clip_sample=False
    )
    return LoadedModel(
        unet=unet,
        vae=vae,
        text_encoders=list(encoders),
        tokenizers=list(tokenizers),
        noise_scheduler=noise_scheduler,
        family=get_family(facts.family),
        prediction_type=facts.prediction_type,
        source=source,
        vae_identity=vae_identity(vae),
        scheduler_config=scheduler_config,
    )
